-- Creates an API key, with its audit record, unless the tenant holds as
-- many keys as it may already.
-- KEYS: 1 the tenant's set of key ids, 2 the key's hash, 3 audit stream.
-- ARGV: 1 most keys or '', 2 key id, 3 audit stream length cap, 4 tenant
--       id, 5 actor, then the key's fields and values.
-- Returns -1 once created, else how many keys the tenant holds.
local held = redis.call('SCARD', KEYS[1])
if ARGV[1] ~= '' and held >= tonumber(ARGV[1]) then return held end
redis.call('HSET', KEYS[2], unpack(ARGV, 6))
redis.call('SADD', KEYS[1], ARGV[2])
local _, now_ns = clock()
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'ts', now_ns, 'tenant', ARGV[4],
  'actor', ARGV[5], 'action', 'create_api_key', 'key', ARGV[2])
return -1
