-- KEYS[1] record; ARGV: token, epoch, lock ttl (ms). Returns 1, or 0 when not the holder.
if not holds(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'l', now + ttl)
redis.call('PEXPIRE', KEYS[1], in_flight_expiry(ttl))
return 1
