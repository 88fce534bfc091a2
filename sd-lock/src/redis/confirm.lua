-- After a grant, with `wait_for_replicas`: write the lease again, unchanged, if it is
-- still ours, so the `WAIT` sent after this script in the same request counts the
-- replicas that hold it (and the token counter, written before it).
-- KEYS[1] lease key; ARGV[1] holder value. Returns 1 (still ours) or 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
  return 1
end
return 0
