-- Become leader if the election has no live term, in one atomic step.
-- KEYS[1] the term (hash: holder, value, token; expires with the term),
-- KEYS[2] token counter (same hash tag)
-- ARGV[1] holder (random, unique per attempt), ARGV[2] value, ARGV[3] ttl in ms
-- Returns the term's token, or nil while another leader's term is live.
-- The token is max(last + 1, server time in µs), as the lock's acquire script hands out.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return nil
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local token = (tonumber(redis.call('GET', KEYS[2]) or '0') or 0) + 1
if now > token then
  token = now
end
local text = string.format('%.0f', token)
redis.call('SET', KEYS[2], text)
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'value', ARGV[2], 'token', text)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return token
