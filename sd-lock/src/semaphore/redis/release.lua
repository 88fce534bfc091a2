-- Give a permit back if it is still ours.
-- KEYS[1] sorted set of leases; ARGV[1] member `slot:holder`.
-- Returns 1 (it was live), 0 (it had expired or was gone).
local t = redis.call('TIME')
local now_ms = math.floor((tonumber(t[1]) * 1000000 + tonumber(t[2])) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(score) > now_ms then
  return 1
end
return 0
