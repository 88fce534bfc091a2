-- Reset the lease's expiry if it is still ours.
-- KEYS[1] lease key; ARGV[1] holder value, ARGV[2] ttl in ms. Returns 1 or 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
