-- sd-ratelimit: decide several limits at once, all or none, in one round trip.
-- A port of src/algorithm.rs on integer microseconds (Lua numbers are doubles, exact
-- below 2^53; the Rust side validates that every value stays below).
--
-- KEYS[i]: the state of limit i; with a penalty, KEYS[n + i] is its block (n limits,
--          2n keys).
-- ARGV[1]: now in microseconds, or '' to read the server's TIME (the default: app
--          servers with skewed clocks then agree).
-- ARGV[2]: 'all' (the limits are one request: all are consumed or none is) or 'each'
--          (a batch of independent requests: each admitted one is consumed).
-- ARGV[3]: the penalty in microseconds (0: none; see `penalize` in prelude.lua). A
--          limit that denies blocks its key even when others make the request fail.
-- ARGV[4 + 7(i-1) ..]: kind, p1, p2, p3, p4, p5, cost for limit i:
--   kind 1, virtual scheduling (GCRA, token bucket, leaky bucket):
--     tick, per_tick, unit, cap, max_wait (-1 when not a queue)
--   kind 2, sliding window: window, limit, 0, 0, 0
-- Returns 6 integers per limit: allowed (0 denied, 1 admitted, 2 refused as a
-- penalty), limit, remaining, retry_after,
-- reset_after, delay (microseconds). In 'all' mode state is written only when every
-- limit admits; each written key expires when it is back to full.

-- `now`, `idiv` and `penalize` come from prelude.lua.

-- The first time at which the virtual clock floor(t / tick) * per_tick reaches v.
local function time_of(v, tick, per_tick)
  local q = idiv(v, per_tick)
  if q * per_tick < v then
    q = q + 1
  end
  return q * tick
end

local out, writes, all = {}, {}, true
local each = ARGV[2] == 'each'
local penalty = tonumber(ARGV[3])
local n = #KEYS
if penalty > 0 then
  n = n / 2
end
for i = 1, n do
  local o = 3 + (i - 1) * 7
  local kind = tonumber(ARGV[o + 1])
  local cost = tonumber(ARGV[o + 7])
  local raw = redis.call('GET', KEYS[i])
  local allowed, limit, remaining, retry, reset, delay, state
  local tick, max_wait = tonumber(ARGV[o + 2]), tonumber(ARGV[o + 6])
  if kind == 1 and tick == 1 and max_wait < 0 then
    -- GCRA and the leaky meter (tick 1, no queue): the same answers with the fewest
    -- operations, as `gcra_decide` in src/algorithm.rs.
    local unit, cap = tonumber(ARGV[o + 4]), tonumber(ARGV[o + 5])
    local s = tonumber(raw) or 0
    local base = s > now and s or now
    local nxt = base + cost * unit
    local used = nxt - now
    limit = cap / unit
    delay = 0
    if used <= cap then
      allowed, retry, reset = true, 0, used
      remaining = idiv(cap - used, unit)
      if cost > 0 then
        state = string.format('%d', nxt)
      end
    else
      allowed, retry, reset = false, used - cap, base - now
      remaining = idiv(math.max(cap - (base - now), 0), unit)
    end
  elseif kind == 1 then
    local per_tick = tonumber(ARGV[o + 3])
    local unit, cap = tonumber(ARGV[o + 4]), tonumber(ARGV[o + 5])
    local s = tonumber(raw) or 0
    local x = idiv(now, tick) * per_tick
    local base = math.max(s, x)
    local nxt = base + cost * unit
    limit = idiv(cap, unit)
    local wait = math.max(time_of(math.max(nxt - cap, 0), tick, per_tick) - now, 0)
    allowed = (nxt - x <= cap) or (max_wait >= 0 and wait <= max_wait)
    local after = base
    if allowed then
      after = nxt
      retry, delay = 0, wait
    else
      retry, delay = wait - math.min(math.max(max_wait, 0), wait), 0
    end
    remaining = idiv(math.max(cap - (after - x), 0), unit)
    reset = math.max(time_of(after, tick, per_tick) - now, 0)
    if allowed and cost > 0 then
      state = string.format('%d', nxt)
    end
  else
    local w, lim = tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3])
    local sidx, sprev, scur = 0, 0, 0
    if raw then
      local a, b, c = string.match(raw, '^(%d+):(%d+):(%d+)$')
      if a then
        sidx, sprev, scur = tonumber(a), tonumber(b), tonumber(c)
      end
    end
    local nidx = idiv(now, w)
    local e = now - nidx * w
    local d = nidx - sidx
    local prev, cur, stored = 0, 0, nidx
    if d == 0 then
      prev, cur = sprev, scur
    elseif d == 1 then
      prev, cur = scur, 0
    elseif d < 0 then
      -- The clock went backwards: read at the start of the stored window.
      e, prev, cur, stored = 0, sprev, scur, sidx
    end
    allowed = cost <= lim and prev * (w - e) + (cur + cost) * w <= lim * w
    local cur_after = cur
    if allowed then
      cur_after = cur + cost
    end
    limit = lim
    remaining = math.max(idiv(math.max(lim * w - prev * (w - e), 0), w) - cur_after, 0)
    if allowed or cost > lim then
      retry = 0
    elseif cur + cost <= lim then
      local slack = idiv((lim - cur - cost) * w, math.max(prev, 1))
      retry = math.max(math.max(w - slack, 0) - e, 0)
    else
      local slack = idiv((lim - cost) * w, math.max(cur, 1))
      retry = (w - e) + math.max(w - slack, 0)
    end
    if cur_after > 0 then
      reset = (w - e) + w
    elseif prev > 0 then
      reset = w - e
    else
      reset = 0
    end
    delay = 0
    if allowed and cost > 0 then
      state = string.format('%d:%d:%d', stored, prev, cur_after)
    end
  end
  local code = allowed and 1 or 0
  if penalty > 0 then
    local b = KEYS[n + i]
    local start
    code, retry, reset, start = penalize(allowed, retry, reset, tonumber(redis.call('GET', b)) or 0, penalty)
    if start then
      redis.call('SET', b, string.format('%d', start), 'PX', math.max(math.ceil(penalty / 1000), 1))
    end
    if code == 2 then
      allowed, remaining, delay, state = false, 0, 0, nil
    end
  end
  all = all and allowed
  if state then
    local px = math.max(math.ceil(reset / 1000), 1)
    if each then
      -- Written at once: a later decision of the batch on the same key must see it.
      redis.call('SET', KEYS[i], state, 'PX', px)
    else
      writes[#writes + 1] = { KEYS[i], state, px }
    end
  end
  local m = #out
  out[m + 1] = code
  out[m + 2] = limit
  out[m + 3] = remaining
  out[m + 4] = retry
  out[m + 5] = reset
  out[m + 6] = delay
end

if all then
  for _, w in ipairs(writes) do
    redis.call('SET', w[1], w[2], 'PX', w[3])
  end
end
return out
