-- KEYS[1] record; ARGV: token, epoch, response, retention (ms). Returns 1, or 0 when not the holder.
if not holds(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 's', 'c', 'r', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
