-- KEYS[1] record; ARGV: token, epoch. Returns 1, or 0 when not the holder.
if not holds(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1])
return 1
