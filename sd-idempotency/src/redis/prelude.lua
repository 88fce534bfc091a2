-- Shared by every script: the server's time in milliseconds, and the holder check.
-- A record is a hash: s = 'i' (in flight) or 'c' (completed), f = fingerprint,
-- e = epoch, t = claim token, l = lock expiry (ms), r = stored response.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local grace = 60000

local function holds(key, token, epoch)
  local r = redis.call('HMGET', key, 's', 't', 'e', 'l')
  return r[1] == 'i' and r[2] == token and r[3] == epoch and tonumber(r[4]) > now
end

local function in_flight_expiry(ttl)
  return ttl + math.max(ttl, grace)
end
