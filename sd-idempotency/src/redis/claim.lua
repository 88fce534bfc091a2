-- KEYS[1] record; ARGV: fingerprint, lock ttl (ms), token.
-- Returns {'claimed', epoch} | {'inflight', ms left} | {'completed', response} | {'mismatch'}.
local ttl = tonumber(ARGV[2])
local r = redis.call('HMGET', KEYS[1], 's', 'f', 'e', 'l', 'r')
local epoch = 1
if r[1] then
  if r[2] ~= ARGV[1] then return {'mismatch'} end
  if r[1] == 'c' then return {'completed', r[5]} end
  local l = tonumber(r[4])
  if l > now then return {'inflight', l - now} end
  epoch = tonumber(r[3]) + 1
end
redis.call('HSET', KEYS[1], 's', 'i', 'f', ARGV[1], 'e', epoch, 't', ARGV[3], 'l', now + ttl)
redis.call('PEXPIRE', KEYS[1], in_flight_expiry(ttl))
return {'claimed', epoch}
