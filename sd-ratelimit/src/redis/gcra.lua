-- sd-ratelimit: GCRA and the leaky meter (virtual scheduling with tick 1 and no queue),
-- the common case, with the fewest operations: the same answers as the fast branch of
-- limit.lua (`gcra_decide` in src/algorithm.rs) for less server work (fewer Lua
-- operations per decision; a batch's states are read with one MGET).
--
-- KEYS[i]: the state of decision i. Decisions are taken in order, each on its own (a
-- later one on the same key sees the earlier one's write).
-- ARGV[1]: now in microseconds, or '' to read the server's TIME.
-- ARGV[2 + 3(i-1) ..]: unit, cap, cost of decision i.
-- Returns 6 integers per decision, as limit.lua: allowed (0/1), limit, remaining,
-- retry_after, reset_after, delay (microseconds). Each written key expires when it is
-- back to full.

-- `now` and `idiv` come from prelude.lua.

local states
if #KEYS == 1 then
  states = { redis.call('GET', KEYS[1]) }
else
  states = redis.call('MGET', unpack(KEYS))
end
local out, written = {}, {}
for i = 1, #KEYS do
  local o = 2 + (i - 1) * 3
  local unit, cap, cost = tonumber(ARGV[o]), tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2])
  local s = tonumber(written[KEYS[i]] or states[i]) or 0
  local base = s > now and s or now
  local nxt = base + cost * unit
  local used = nxt - now
  local allowed, remaining, retry, reset
  if used <= cap then
    allowed, remaining, retry, reset = 1, idiv(cap - used, unit), 0, used
    if cost > 0 then
      local state = string.format('%d', nxt)
      redis.call('SET', KEYS[i], state, 'PX', math.max(math.ceil(used / 1000), 1))
      written[KEYS[i]] = state
    end
  else
    allowed, retry, reset = 0, used - cap, base - now
    remaining = idiv(math.max(cap - (base - now), 0), unit)
  end
  local n = #out
  out[n + 1] = allowed
  out[n + 2] = cap / unit
  out[n + 3] = remaining
  out[n + 4] = retry
  out[n + 5] = reset
  out[n + 6] = 0
end
return out
