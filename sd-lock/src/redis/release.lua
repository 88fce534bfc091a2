-- Compare-and-delete: free the lease only if it is still ours.
-- KEYS[1] lease key; ARGV[1] holder value. Returns 1 (deleted) or 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
