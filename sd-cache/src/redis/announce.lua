-- A two-tier write or invalidation: publish it to every instance and return, from the same
-- instant, the server's time and every registered instance with its lease expiry, so the
-- writer knows whose acknowledgement to wait for, and for how long at most.
-- KEYS[1] instance registry. ARGV[1] channel, ARGV[2] message, ARGV[3] '1' on a cluster:
-- SPUBLISH (the channel shares KEYS[1]'s slot), else PUBLISH.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call(ARGV[3] == '1' and 'SPUBLISH' or 'PUBLISH', ARGV[1], ARGV[2])
return {now, redis.call('HGETALL', KEYS[1])}
