-- Take the lease and hand out its fencing token, in one atomic step.
-- KEYS[1] lease key, KEYS[2] token counter (same hash tag)
-- ARGV[1] holder value (random, unique per attempt), ARGV[2] ttl in ms
-- Returns the token (an integer), or nil when another holder has the lease.
--
-- The token is max(last + 1, server time in µs): strictly increasing while the counter
-- lives, and still larger than every earlier token after a restart that lost the
-- counter, as long as the server clock did not step back. It stays below 2^53, so Lua
-- doubles hold it exactly.
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return nil
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local token = (tonumber(redis.call('GET', KEYS[2]) or '0') or 0) + 1
if now > token then
  token = now
end
redis.call('SET', KEYS[2], string.format('%.0f', token))
return token
