-- Extend the term if it is still ours.
-- KEYS[1] the term; ARGV[1] holder, ARGV[2] ttl in ms. Returns 1 or 0.
if redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
