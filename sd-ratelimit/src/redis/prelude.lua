-- sd-ratelimit: the start of every script (prepended to limit.lua and gcra.lua when
-- they are loaded): the clock, exact integer division and the penalty.
-- ARGV[1]: now in microseconds, or '' to read the server's TIME (the default: app
-- servers with skewed clocks then agree).

if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end

-- floor(a / b), exact for non-negative integers below 2^53.
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

-- The penalty (`penalize` in src/algorithm/penalty.rs) on a decision at `now`: `blocked`
-- is the end of the key's block (0 or past: none), `penalty` the block a denial starts
-- (0: none). Returns the answer (0 denied, 1 admitted, 2 refused as a penalty), the
-- retry and reset times, and the end of a block to store, or nil. A refusal as a
-- penalty takes nothing: the caller then writes no state, and answers no remaining
-- and no delay.
local function penalize(allowed, retry, reset, blocked, penalty)
  local left, start
  if blocked > now then
    left = blocked - now
  elseif not allowed and penalty > 0 then
    left, start = penalty, now + penalty
  else
    return allowed and 1 or 0, retry, reset, nil
  end
  return 2, math.max(retry, left), math.max(reset, left), start
end
