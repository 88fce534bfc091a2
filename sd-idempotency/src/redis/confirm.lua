-- KEYS[1] record; ARGV: token, epoch. With `wait_for_replicas`, after a claim, a
-- completion or an extension: write the record's token again, unchanged, if the record
-- is still this claim's, so the `WAIT` sent behind this script in the same request
-- counts the replicas that hold the record. Returns 1 (still this claim's) or 0.
local r = redis.call('HMGET', KEYS[1], 't', 'e')
if r[1] == ARGV[1] and r[2] == ARGV[2] then
  redis.call('HSET', KEYS[1], 't', ARGV[1])
  return 1
end
return 0
