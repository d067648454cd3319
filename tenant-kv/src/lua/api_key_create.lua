-- Creates an API key, with its audit record, unless the tenant holds as
-- many keys as it may already.
-- KEYS: 1 the tenant's set of key ids, 2 audit stream, 3 the key's hash,
--       unless the caller wrote it already (on a Redis Cluster, where it
--       lies in another slot than the tenant's keys).
-- ARGV: 1 most keys or '', 2 key id, 3 audit stream length cap, 4 tenant
--       id, 5 actor, then the key's fields and values (with KEYS[3]).
-- Returns -1 once created, else how many keys the tenant holds.
local held = redis.call('SCARD', KEYS[1])
if ARGV[1] ~= '' and held >= tonumber(ARGV[1]) then return held end
if KEYS[3] then redis.call('HSET', KEYS[3], unpack(ARGV, 6)) end
redis.call('SADD', KEYS[1], ARGV[2])
audit_add(KEYS[2], ARGV[3], '{"ts":"' .. ns_text(clock_us())
  .. '","action":"create_api_key","actor":"' .. json_text(ARGV[5])
  .. '","key":"' .. json_text(ARGV[2]) .. '","tenant":"' .. ARGV[4] .. '"}')
return -1
