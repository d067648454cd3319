-- Converts items from layout 1 (a hash each) to layout 2 (an envelope
-- each), each on its own: an item already converted, or written since
-- under layout 2, keeps layout 2's; the expiry time (and so the TTL) is
-- kept to the millisecond, with the version, times, size, metadata and
-- value. Then records how far the tenant's walk through its index got.
-- KEYS: 1 the tenant's migration progress (a hash), 2 its index, then
--       each item's key under layout 1, then under layout 2.
-- ARGV: 1 the batch's last index entry, or '' for items met outside the
--       index (added to it), then each item's key.
-- Returns how many items were converted.
local n = #ARGV - 1
local converted = 0
for i = 1, n do
  local old, new = KEYS[2 + i], KEYS[2 + n + i]
  local f = redis.call('HMGET', old, 'value', 'metadata', 'version', 'created', 'updated',
    'expires', 'size')
  if f[1] then
    if redis.call('EXISTS', new) == 0 then
      local expires = tonumber(f[6] or '0')
      local value = envelope(tonumber(f[3]), tonumber(f[4]), tonumber(f[5]), expires,
        tonumber(f[7] or '0'), f[2] or '', f[1])
      if expires > 0 then
        redis.call('SET', new, value, 'PXAT', expires)
      else
        redis.call('SET', new, value)
      end
      if ARGV[1] == '' then redis.call('ZADD', KEYS[2], 'NX', 0, ARGV[1 + i]) end
      converted = converted + 1
    end
    redis.call('DEL', old)
  end
end
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'after', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'converted', converted)
end
return converted
