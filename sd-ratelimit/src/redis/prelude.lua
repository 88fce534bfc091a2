-- sd-ratelimit: the start of every script (prepended to limit.lua and gcra.lua when
-- they are loaded): the clock and exact integer division.
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
