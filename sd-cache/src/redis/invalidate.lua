-- Invalidate an entry: keep a tombstone holding a bumped version, so a load that began
-- before the invalidation cannot store its older value; release nothing; publish.
-- KEYS[1] data hash. ARGV[1] tombstone ttl (ms), ARGV[2] channel, ARGV[3] key as published.
redis.call('HDEL', KEYS[1], 'v', 'd', 'e', 'n')
local ver = redis.call('HINCRBY', KEYS[1], 'ver', 1)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
redis.call('PUBLISH', ARGV[2], ARGV[3])
return ver
