-- A two-tier instance renews its lease and sends itself a ping through the invalidation
-- channel (receiving it proves every earlier message on that channel reached it).
-- KEYS[1] instance registry (hash: instance id -> lease expiry, server ms).
-- ARGV[1] instance id, ARGV[2] lease ms, ARGV[3] channel, ARGV[4] ping message,
-- ARGV[5] '1' on a cluster: SPUBLISH (the channel shares KEYS[1]'s slot), else PUBLISH.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], now + lease)
-- Forget instances whose lease ran out long ago (they died without saying so).
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) < now - 60000 then
    redis.call('HDEL', KEYS[1], all[i])
  end
end
redis.call('PEXPIRE', KEYS[1], math.max(120000, lease * 10))
redis.call(ARGV[5] == '1' and 'SPUBLISH' or 'PUBLISH', ARGV[3], ARGV[4])
return now
