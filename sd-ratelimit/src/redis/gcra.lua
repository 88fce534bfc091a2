-- sd-ratelimit: GCRA and the leaky meter (virtual scheduling with tick 1 and no queue),
-- the common case, with the fewest operations: the same answers as the fast branch of
-- limit.lua (`gcra_decide` in src/algorithm.rs) for less server work (fewer Lua
-- operations per decision; a batch's states are read with one MGET).
--
-- KEYS[i]: the state of decision i; with a penalty, KEYS[n + i] is its block (n
-- decisions, 2n keys). Decisions are taken in order, each on its own (a later one on
-- the same key sees the earlier one's writes).
-- ARGV[1]: now in microseconds, or '' to read the server's TIME.
-- ARGV[2]: the penalty in microseconds (0: none; see `penalize` in prelude.lua).
-- ARGV[3 + 3(i-1) ..]: unit, cap, cost of decision i.
-- Returns 6 integers per decision, as limit.lua: allowed (0 denied, 1 admitted, 2
-- refused as a penalty), limit, remaining, retry_after, reset_after, delay
-- (microseconds). Each written key expires when it is back to full, a block when it
-- ends.

-- `now`, `idiv` and `penalize` come from prelude.lua.

local penalty = tonumber(ARGV[2])
local n = #KEYS
if penalty > 0 then
  n = n / 2
end
local states
if #KEYS == 1 then
  states = { redis.call('GET', KEYS[1]) }
else
  states = redis.call('MGET', unpack(KEYS))
end
local out, written = {}, {}
for i = 1, n do
  local o = 3 + (i - 1) * 3
  local unit, cap, cost = tonumber(ARGV[o]), tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2])
  local s = tonumber(written[KEYS[i]] or states[i]) or 0
  local base = s > now and s or now
  local nxt = base + cost * unit
  local used = nxt - now
  local allowed, remaining, retry, reset
  if used <= cap then
    allowed, remaining, retry, reset = 1, idiv(cap - used, unit), 0, used
  else
    allowed, retry, reset = 0, used - cap, base - now
    remaining = idiv(math.max(cap - (base - now), 0), unit)
  end
  if penalty > 0 then
    local b = KEYS[n + i]
    local blocked = tonumber(written[b] or states[n + i]) or 0
    local start
    allowed, retry, reset, start = penalize(allowed == 1, retry, reset, blocked, penalty)
    if start then
      written[b] = string.format('%d', start)
      redis.call('SET', b, written[b], 'PX', math.max(math.ceil(penalty / 1000), 1))
    end
    if allowed == 2 then
      remaining = 0
    end
  end
  if allowed == 1 and cost > 0 then
    local state = string.format('%d', nxt)
    redis.call('SET', KEYS[i], state, 'PX', math.max(math.ceil(used / 1000), 1))
    written[KEYS[i]] = state
  end
  local m = #out
  out[m + 1] = allowed
  out[m + 2] = cap / unit
  out[m + 3] = remaining
  out[m + 4] = retry
  out[m + 5] = reset
  out[m + 6] = 0
end
return out
