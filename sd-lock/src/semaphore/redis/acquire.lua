-- Take a permit of a counting semaphore, in one atomic step.
-- KEYS[1] sorted set of leases (member `slot:holder`, score = expiry in server ms),
-- KEYS[2] token counter (same hash tag)
-- ARGV[1] holder value (random, unique per attempt), ARGV[2] ttl in ms, ARGV[3] permits
-- Returns {slot, token}, or nil when every permit is held.
--
-- Expired leases are reaped first (score <= now, on the server clock). Then the rule of
-- sd_lock::semaphore::free_slot: a slot only while fewer than `permits` leases are
-- live, the lowest slot in 0..permits without one. The token is
-- max(last + 1, server time in µs), as the lock's acquire script hands out.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local permits = tonumber(ARGV[3])
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
if #members >= permits then
  return nil
end
local taken = {}
for _, m in ipairs(members) do
  local slot = tonumber(string.match(m, '^(%d+):'))
  if slot then
    taken[slot] = true
  end
end
local slot = nil
for i = 0, permits - 1 do
  if not taken[i] then
    slot = i
    break
  end
end
if slot == nil then
  return nil
end
local token = (tonumber(redis.call('GET', KEYS[2]) or '0') or 0) + 1
if now_us > token then
  token = now_us
end
redis.call('SET', KEYS[2], string.format('%.0f', token))
local expires = now_ms + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], expires, slot .. ':' .. ARGV[1])
-- The set lives as long as its longest lease.
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]) + 1)
return {slot, token}
