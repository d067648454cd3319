-- Writes to a tenant's items, all or nothing, with the index, usage
-- counters, rate limit and one audit record per write. Each write does
-- what it needs and no more: it reads the header of the item it replaces,
-- and touches the index, the expiry index and the counters only when they
-- change. Items whose TTL ran out are purged by the expiry watcher, except
-- one that a write replaces, which it takes out of the counters first
-- (with its `key_expiration` record).
-- Item times come from Redis's clock (`TIME`, once per call); the
-- records' `ts` is the writer's clock, in ns. Audit records are appended
-- to the stream, an entry each, or staged (`audit_stage`) for
-- log-buffer's offloader to pack.
--
-- KEYS: 1 usage, 2 audit, 3 index, 4 expiry, 5 expiring sizes, 6 rate,
--       7 the audit stream's staging list, then the item key of each
--       write, in order, then (while a migration runs) each write's item
--       key under layout 1.
-- ARGV: 1 actor, 2 tenant id, 3 audit stream length cap, 4 the records'
--       ts (ns), 5 max keys or '', 6 max bytes or '', 7 rate (writes per
--       second) or '', 8 burst, 9 '1' to stage audit records or '',
--       then 6 per write: op (create | put |
--       update | delete), key, expected version or '', TTL in ms or '',
--       metadata (JSON) or '', value (JSON).
-- Returns, once written, each write's envelope header, one after the
-- other (a deletion's with created and expires 0); else {status, index of
-- the write at fault (1-based), number}.

local HEADER = 9
local writes = (#ARGV - HEADER) / 6
local legacy = #KEYS > 7 + writes

-- What each write finds under its key (the item's header, or while a
-- migration runs its layout 1 hash), checked before any is done.
local found = {}
local key_delta, byte_delta = 0, 0
for i = 1, writes do
  local at = HEADER + (i - 1) * 6
  local op, key, expected = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local version, created, expires, size = envelope_header(KEYS[7 + i])
  local exists, from_legacy, expired_size = version ~= nil, false, nil
  if not exists and legacy then
    local old = redis.call('HMGET', KEYS[7 + writes + i], 'version', 'created', 'expires', 'size')
    if old[1] then
      exists, from_legacy = true, true
      version, created = tonumber(old[1]), tonumber(old[2])
      expires, size = tonumber(old[3] or '0'), tonumber(old[4] or '0')
    end
  end
  if not exists then
    version, created, expires, size = 0, nil, 0, 0
    if redis.call('ZSCORE', KEYS[4], key) then
      -- Expired, still counted: this write purges it.
      expired_size = tonumber(redis.call('HGET', KEYS[5], key) or '0')
      key_delta, byte_delta = key_delta - 1, byte_delta - expired_size
    end
  end
  if op == 'create' and exists then return {'exists', i, version} end
  if (op == 'update' or op == 'delete') and not exists then return {'missing', i, 0} end
  if expected ~= '' and (not exists or tonumber(expected) ~= version) then
    return {'conflict', i, version}
  end
  local new_size = 0
  if op == 'delete' then
    key_delta = key_delta - 1
  else
    new_size = #key + #ARGV[at + 5] + #ARGV[at + 6]
    if not exists then key_delta = key_delta + 1 end
  end
  byte_delta = byte_delta + new_size - size
  found[i] = {exists, created, expires, size, new_size, from_legacy, expired_size}
end
if ARGV[5] ~= '' and key_delta > 0 then
  local keys = tonumber(redis.call('HGET', KEYS[1], 'keys') or '0') + key_delta
  if keys > tonumber(ARGV[5]) then return {'quota_keys', 0, keys} end
end
if ARGV[6] ~= '' and byte_delta > 0 then
  local bytes = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0') + byte_delta
  if bytes > tonumber(ARGV[6]) then return {'quota_bytes', 0, bytes} end
end
-- Redis's clock, once: µs for the write rate, ms for the items' times.
local now_us = clock_us()
-- The write rate: each write books 1/rate s; at most `burst` ahead. A
-- batch larger than the burst could never go through: refused as such.
if ARGV[7] ~= '' then
  local interval, burst = math.floor(1000000 / tonumber(ARGV[7])), tonumber(ARGV[8])
  if writes > burst then return {'rate_batch', 0, burst} end
  local allowed, _, retry, _, tat = gcra_check(KEYS[6], now_us, interval, burst, writes)
  if not allowed then return {'rate', 0, math.ceil(retry / 1000)} end
  gcra_book(KEYS[6], tat, interval, burst)
end

-- `actor` is escaped for JSON already; the tenant id needs no escaping.
-- A version is written whole (`..` would write 1e+14 from 10^14 on).
local function audit(actor, action, key, version, size)
  if version ~= '' then version = string.format('%d', version) end
  local line = '{"ts":"' .. ARGV[4] .. '","action":"' .. action .. '","actor":"' .. actor
    .. '","key":"' .. json_text(key) .. '","size":"' .. size .. '","tenant":"' .. ARGV[2]
    .. '","version":"' .. version .. '"}'
  if ARGV[9] == '' then
    audit_add(KEYS[2], ARGV[3], line)
  else
    audit_stage(KEYS[2], KEYS[7], ARGV[3], line)
  end
end

-- One increment of the tenant's version counter for the whole batch.
local actor = json_text(ARGV[1])
local now_ms = math.floor(now_us / 1000)
local first = redis.call('HINCRBY', KEYS[1], 'rev', writes) - writes
local headers = {}
for i = 1, writes do
  local at = HEADER + (i - 1) * 6
  local op, key, ttl = ARGV[at + 1], ARGV[at + 2], ARGV[at + 4]
  local f, item, version = found[i], KEYS[7 + i], first + i
  local exists, created, expires, size, new_size = f[1], f[2], f[3], f[4], f[5]
  if f[6] then redis.call('DEL', KEYS[7 + writes + i]) end
  if f[7] then audit('system', 'key_expiration', key, '', f[7]) end
  if op == 'delete' then
    audit(actor, 'delete_key', key, version, size)
    redis.call('DEL', item)
    redis.call('ZREM', KEYS[3], key)
    if expires > 0 then
      redis.call('ZREM', KEYS[4], key)
      redis.call('HDEL', KEYS[5], key)
    end
    headers[i] = struct.pack(ENVELOPE, 1, version, 0, now_ms, 0, 0, 0)
  else
    local action = 'update_key'
    if not exists then action = 'create_key' end
    audit(actor, action, key, version, new_size)
    created = created or now_ms
    local expires_at = 0
    if ttl ~= '' then expires_at = now_ms + tonumber(ttl) end
    local metadata = ARGV[at + 5]
    local header = struct.pack(ENVELOPE, 1, version, created, now_ms, expires_at, new_size, #metadata)
    headers[i] = header
    if expires_at > 0 then
      redis.call('SET', item, header .. metadata .. ARGV[at + 6], 'PXAT', expires_at)
      redis.call('ZADD', KEYS[4], expires_at, key)
      redis.call('HSET', KEYS[5], key, new_size)
    else
      redis.call('SET', item, header .. metadata .. ARGV[at + 6])
      if expires > 0 or f[7] then
        redis.call('ZREM', KEYS[4], key)
        redis.call('HDEL', KEYS[5], key)
      end
    end
    if not exists then redis.call('ZADD', KEYS[3], 0, key) end
  end
end
if key_delta ~= 0 then redis.call('HINCRBY', KEYS[1], 'keys', key_delta) end
if byte_delta ~= 0 then redis.call('HINCRBY', KEYS[1], 'bytes', byte_delta) end
if writes == 1 then return headers[1] end
return table.concat(headers)
