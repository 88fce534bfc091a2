-- Read an entry and the server's time in one round trip; optionally take the load lock.
-- KEYS[1] data hash, KEYS[2] load lock (same hash tag).
-- ARGV[1] lock token, ARGV[2] lock ttl (ms),
-- ARGV[3] '0' never lock, '1' lock when the entry is missing or expired,
--         '2' lock for an early refresh, only while the entry still has version ARGV[4]
--         (a refresh decided on an entry that was since replaced must not load again).
-- Returns {value, delta_ms, expiry_ms, negative, version, now_ms, locked}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'v', 'd', 'e', 'n', 'ver')
local e = tonumber(h[3])
local fresh = e ~= nil and now < e
local ver = h[5] or '0'
local locked = 0
if (ARGV[3] == '2' and ver == ARGV[4]) or (ARGV[3] == '1' and not fresh) then
  if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
    locked = 1
  end
end
return {h[1], h[2], h[3], h[4], ver, now, locked}
