-- Store an entry whose expiry is computed from the server's time, release the load lock if
-- we hold it, and tell every process the key changed.
-- KEYS[1] data hash, KEYS[2] load lock.
-- ARGV[1] value, ARGV[2] delta ms, ARGV[3] lifetime ms, ARGV[4] stale-on-error ms,
-- ARGV[5] negative '0'/'1', ARGV[6] expected version ('' = write unconditionally),
-- ARGV[7] lock token ('' = none), ARGV[8] channel, ARGV[9] key as published.
-- Returns the new version, or -1 when the expected version no longer holds.
local function unlock()
  if ARGV[7] ~= '' and redis.call('GET', KEYS[2]) == ARGV[7] then
    redis.call('DEL', KEYS[2])
  end
end
if ARGV[6] ~= '' then
  local cur = redis.call('HGET', KEYS[1], 'ver') or '0'
  if cur ~= ARGV[6] then
    unlock()
    redis.call('PUBLISH', ARGV[8], ARGV[9])
    return -1
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local life = tonumber(ARGV[3])
local ver = redis.call('HINCRBY', KEYS[1], 'ver', 1)
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2], 'e', now + life, 'n', ARGV[5])
redis.call('PEXPIRE', KEYS[1], life + tonumber(ARGV[4]))
unlock()
redis.call('PUBLISH', ARGV[8], ARGV[9])
return ver
