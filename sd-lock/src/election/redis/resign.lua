-- End the term if it is still ours.
-- KEYS[1] the term; ARGV[1] holder. Returns 1 (ended) or 0.
if redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
