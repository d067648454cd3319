-- Writes to a tenant's items, all or nothing, with the index, usage
-- counters, rate limit and one audit record per write. Items whose TTL ran
-- out leave the index first (16 per call, or 256 when called with no
-- writes, to purge), each with a `key_expiration` record by `system`.
--
-- KEYS: 1 index, 2 expiry, 3 expiring sizes, 4 usage, 5 audit, 6 rate,
--       then the item key of each write, in order.
-- ARGV: 1 actor, 2 item key prefix, 3 max keys or '', 4 max bytes or '',
--       5 audit stream length cap, 6 tenant id, 7 rate (writes per second)
--       or '', 8 burst, then 6 per write: op (create | put | update |
--       delete), key, expected version or '', value (JSON), metadata (JSON)
--       or '', TTL in ms or ''.
-- Returns {'ok', version, created ms, updated ms, ...} with three numbers
-- per write, or {'ok', items purged} with no writes, or
-- {status, index of the write at fault (1-based), number}.

local HEADER = 8
local writes = (#ARGV - HEADER) / 6
local now_ms, now_ns, now_us = clock()

local function audit(actor, action, item_key, version, size)
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*',
    'ts', now_ns, 'tenant', ARGV[6], 'actor', actor, 'action', action,
    'key', item_key, 'version', tostring(version), 'size', tostring(size))
end

local function usage(field)
  return tonumber(redis.call('HGET', KEYS[4], field) or '0')
end

local function arg(i, field)
  return ARGV[HEADER + (i - 1) * 6 + field]
end

local purge_limit = 16
if writes == 0 then purge_limit = 256 end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0, purge_limit)
local purged = 0
for _, gone in ipairs(expired) do
  -- The item itself may still be there for a moment (Redis expires lazily)
  -- or may have been written again since, with a new TTL or none.
  if redis.call('EXISTS', ARGV[2] .. gone) == 0 then
    local size = tonumber(redis.call('HGET', KEYS[3], gone) or '0')
    redis.call('ZREM', KEYS[1], gone)
    redis.call('ZREM', KEYS[2], gone)
    redis.call('HDEL', KEYS[3], gone)
    redis.call('HINCRBY', KEYS[4], 'keys', -1)
    redis.call('HINCRBY', KEYS[4], 'bytes', -size)
    audit('system', 'key_expiration', gone, '', size)
    purged = purged + 1
  end
end
if writes == 0 then return {'ok', purged} end

-- Check every write before doing any.
local state = {}
local key_delta, byte_delta = 0, 0
for i = 1, writes do
  local item = KEYS[6 + i]
  local op, expected = arg(i, 1), arg(i, 3)
  local exists = redis.call('EXISTS', item) == 1
  local current, old_size, created = 0, 0, now_ms
  if exists then
    local fields = redis.call('HMGET', item, 'version', 'size', 'created')
    current, old_size, created = tonumber(fields[1]), tonumber(fields[2]), tonumber(fields[3])
  end
  if op == 'create' and exists then return {'exists', i, current} end
  if (op == 'update' or op == 'delete') and not exists then return {'missing', i, 0} end
  if expected ~= '' and (not exists or tonumber(expected) ~= current) then
    return {'conflict', i, current}
  end
  local size = 0
  if op ~= 'delete' then size = #arg(i, 2) + #arg(i, 4) + #arg(i, 5) end
  if op == 'delete' then key_delta = key_delta - 1
  elseif not exists then key_delta = key_delta + 1 end
  byte_delta = byte_delta + size - old_size
  state[i] = {exists = exists, old_size = old_size, size = size, created = created}
end
if ARGV[3] ~= '' and key_delta > 0 and usage('keys') + key_delta > tonumber(ARGV[3]) then
  return {'quota_keys', 0, usage('keys') + key_delta}
end
if ARGV[4] ~= '' and byte_delta > 0 and usage('bytes') + byte_delta > tonumber(ARGV[4]) then
  return {'quota_bytes', 0, usage('bytes') + byte_delta}
end
-- The write rate: each write books 1/rate s; at most `burst` ahead. A
-- batch larger than the burst could never go through: refused as such.
if ARGV[7] ~= '' then
  local interval, burst = math.floor(1000000 / tonumber(ARGV[7])), tonumber(ARGV[8])
  if writes > burst then return {'rate_batch', 0, burst} end
  local allowed, _, retry, _, tat = gcra_check(KEYS[6], now_us, interval, burst, writes)
  if not allowed then return {'rate', 0, math.ceil(retry / 1000)} end
  gcra_book(KEYS[6], tat, interval, burst)
end

local reply = {'ok'}
for i = 1, writes do
  local item, op, key = KEYS[6 + i], arg(i, 1), arg(i, 2)
  local s = state[i]
  local version = redis.call('HINCRBY', KEYS[4], 'rev', 1)
  if op == 'delete' then
    redis.call('DEL', item)
    redis.call('ZREM', KEYS[1], key)
    redis.call('ZREM', KEYS[2], key)
    redis.call('HDEL', KEYS[3], key)
    audit(ARGV[1], 'delete_key', key, version, s.old_size)
    table.insert(reply, version)
    table.insert(reply, 0)
    table.insert(reply, now_ms)
  else
    redis.call('DEL', item)
    local fields = {'value', arg(i, 4), 'version', version, 'created', s.created,
      'updated', now_ms, 'size', s.size}
    if arg(i, 5) ~= '' then
      table.insert(fields, 'metadata')
      table.insert(fields, arg(i, 5))
    end
    local expires = nil
    if arg(i, 6) ~= '' then
      expires = now_ms + tonumber(arg(i, 6))
      table.insert(fields, 'expires')
      table.insert(fields, expires)
    end
    redis.call('HSET', item, unpack(fields))
    if expires then
      redis.call('PEXPIREAT', item, expires)
      redis.call('ZADD', KEYS[2], expires, key)
      redis.call('HSET', KEYS[3], key, s.size)
    else
      redis.call('ZREM', KEYS[2], key)
      redis.call('HDEL', KEYS[3], key)
    end
    redis.call('ZADD', KEYS[1], 0, key)
    local action = 'create_key'
    if s.exists then action = 'update_key' end
    audit(ARGV[1], action, key, version, s.size)
    table.insert(reply, version)
    table.insert(reply, s.created)
    table.insert(reply, now_ms)
  end
end
if key_delta ~= 0 then redis.call('HINCRBY', KEYS[4], 'keys', key_delta) end
if byte_delta ~= 0 then redis.call('HINCRBY', KEYS[4], 'bytes', byte_delta) end
return reply
