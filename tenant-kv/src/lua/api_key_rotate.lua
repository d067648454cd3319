-- Gives an API key a new secret, the one it replaces staying valid until a
-- time, unless the key changed since it was read (revoked, or rotated by
-- another caller): a rotation never brings back a revoked key, nor drops
-- a secret another rotation handed out.
-- KEYS: 1 the key's hash, 2 audit stream, unless the caller wrote the
--       record already (on a Redis Cluster, where it lies in another slot).
-- ARGV: 1 the secret's hash as read, 2 the new one, 3 until when the old
--       one stays valid (ms), 4 audit stream length cap, 5 tenant id,
--       6 actor, 7 key id.
-- Returns 1 once rotated, 0 if the key changed.
if redis.call('HGET', KEYS[1], 'hash') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'hash', ARGV[2], 'previous_hash', ARGV[1], 'previous_until', ARGV[3])
if KEYS[2] then
  audit_add(KEYS[2], ARGV[4], '{"ts":"' .. ns_text(clock_us())
    .. '","action":"rotate_api_key","actor":"' .. json_text(ARGV[6])
    .. '","key":"' .. json_text(ARGV[7]) .. '","tenant":"' .. ARGV[5] .. '"}')
end
return 1
