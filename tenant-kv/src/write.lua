-- One write to a tenant's item, with its index, usage counters and audit
-- record, all or nothing. Expired items met on the way leave the index.
--
-- KEYS: 1 item, 2 index, 3 expiry, 4 expiring sizes, 5 usage, 6 audit
-- ARGV: 1 op (create | put | update | delete), 2 item key,
--       3 expected version or '', 4 value (JSON), 5 metadata (JSON) or '',
--       6 TTL in ms or '', 7 actor, 8 item key prefix, 9 max keys or '',
--       10 max bytes or '', 11 audit stream length cap, 12 tenant id
-- Returns {status, version or count, created ms, updated ms}.

local op, key, expected = ARGV[1], ARGV[2], ARGV[3]
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local now_ns = time[1] .. string.format('%06d', tonumber(time[2])) .. '000'

local function audit(action, item_key, version, size)
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[11], '*',
    'ts', now_ns, 'tenant', ARGV[12], 'actor', ARGV[7], 'action', action,
    'key', item_key, 'version', tostring(version), 'size', tostring(size))
end

local function usage(field)
  return tonumber(redis.call('HGET', KEYS[5], field) or '0')
end

-- Items whose TTL ran out leave the index, a few per write.
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now_ms, 'LIMIT', 0, 16)
for _, gone in ipairs(expired) do
  if redis.call('EXISTS', ARGV[8] .. gone) == 0 then
    local size = tonumber(redis.call('HGET', KEYS[4], gone) or '0')
    redis.call('ZREM', KEYS[2], gone)
    redis.call('ZREM', KEYS[3], gone)
    redis.call('HDEL', KEYS[4], gone)
    redis.call('HINCRBY', KEYS[5], 'keys', -1)
    redis.call('HINCRBY', KEYS[5], 'bytes', -size)
    audit('key_expiration', gone, '', size)
  end
end

local exists = redis.call('EXISTS', KEYS[1]) == 1
local current = 0
local old_size = 0
if exists then
  current = tonumber(redis.call('HGET', KEYS[1], 'version'))
  old_size = tonumber(redis.call('HGET', KEYS[1], 'size'))
end
if op == 'create' and exists then return {'exists', current, 0, 0} end
if (op == 'update' or op == 'delete') and not exists then return {'missing', 0, 0, 0} end
if expected ~= '' and (not exists or tonumber(expected) ~= current) then
  return {'conflict', current, 0, 0}
end

if op == 'delete' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], key)
  redis.call('ZREM', KEYS[3], key)
  redis.call('HDEL', KEYS[4], key)
  redis.call('HINCRBY', KEYS[5], 'keys', -1)
  redis.call('HINCRBY', KEYS[5], 'bytes', -old_size)
  local version = redis.call('HINCRBY', KEYS[5], 'rev', 1)
  audit('delete_key', key, version, old_size)
  return {'ok', version, 0, now_ms}
end

local size = #key + #ARGV[4] + #ARGV[5]
if not exists and ARGV[9] ~= '' and usage('keys') + 1 > tonumber(ARGV[9]) then
  return {'quota_keys', usage('keys') + 1, 0, 0}
end
if ARGV[10] ~= '' and usage('bytes') - old_size + size > tonumber(ARGV[10]) then
  return {'quota_bytes', usage('bytes') - old_size + size, 0, 0}
end

local version = redis.call('HINCRBY', KEYS[5], 'rev', 1)
local created = now_ms
if exists then created = tonumber(redis.call('HGET', KEYS[1], 'created')) end
redis.call('DEL', KEYS[1])
local fields = {'value', ARGV[4], 'version', version, 'created', created,
  'updated', now_ms, 'size', size}
if ARGV[5] ~= '' then
  table.insert(fields, 'metadata')
  table.insert(fields, ARGV[5])
end
local expires = nil
if ARGV[6] ~= '' then
  expires = now_ms + tonumber(ARGV[6])
  table.insert(fields, 'expires')
  table.insert(fields, expires)
end
redis.call('HSET', KEYS[1], unpack(fields))
if expires then
  redis.call('PEXPIREAT', KEYS[1], expires)
  redis.call('ZADD', KEYS[3], expires, key)
  redis.call('HSET', KEYS[4], key, size)
else
  redis.call('ZREM', KEYS[3], key)
  redis.call('HDEL', KEYS[4], key)
end
redis.call('ZADD', KEYS[2], 0, key)
if not exists then redis.call('HINCRBY', KEYS[5], 'keys', 1) end
redis.call('HINCRBY', KEYS[5], 'bytes', size - old_size)
local action = 'create_key'
if exists then action = 'update_key' end
audit(action, key, version, size)
return {'ok', version, created, now_ms}
