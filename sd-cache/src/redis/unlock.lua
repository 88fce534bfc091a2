-- Release the load lock if we still hold it (the load failed) and wake the waiters.
-- KEYS[1] load lock. ARGV[1] token, ARGV[2] channel, ARGV[3] key as published.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
