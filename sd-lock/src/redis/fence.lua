-- A fenced register: refuse any operation whose token is older than the newest seen.
-- KEYS[1] register hash {token, value}
-- ARGV[1] token (decimal u64, no leading zeros), ARGV[2] 'check' | 'get' | 'set',
-- ARGV[3] the value to set
-- Returns {'stale', newest} or {'ok', value-or-nil}.
-- Tokens compare as decimal strings (length first), exact for every u64.
local function older(a, b)
  if #a ~= #b then
    return #a < #b
  end
  return a < b
end
local newest = redis.call('HGET', KEYS[1], 'token')
if newest and older(ARGV[1], newest) then
  return {'stale', newest}
end
redis.call('HSET', KEYS[1], 'token', ARGV[1])
if ARGV[2] == 'set' then
  redis.call('HSET', KEYS[1], 'value', ARGV[3])
  return {'ok', false}
end
if ARGV[2] == 'get' then
  return {'ok', redis.call('HGET', KEYS[1], 'value')}
end
return {'ok', false}
