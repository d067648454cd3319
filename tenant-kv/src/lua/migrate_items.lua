-- Converts items from layout 1 (a hash each) to layout 2 (an envelope
-- each), each on its own: an item already converted, or written since
-- under layout 2, keeps layout 2's; the expiry time (and so the TTL) is
-- kept to the millisecond, with the version, times, size, metadata and
-- value. Then records how far the tenant's walk through its index got.
-- KEYS: 1 the tenant's migration progress (a hash), 2 its index, 3 its
--       usage, 4 its expiry index, 5 its expiring sizes, then each item's
--       key under layout 1, then under layout 2.
-- ARGV: 1 the batch's last index entry, or '' for items met outside the
--       index (added to it, with their usage and expiry bookkeeping), then
--       each item's key.
-- Returns how many items were converted.
local ITEMS = 5
local n = #ARGV - 1

-- An item met outside the index joins it as a write would have put it.
local function book(key, expires, size)
  if redis.call('ZADD', KEYS[2], 'NX', 0, key) == 0 then return end
  redis.call('HINCRBY', KEYS[3], 'keys', 1)
  redis.call('HINCRBY', KEYS[3], 'bytes', size)
  if expires > 0 then
    redis.call('ZADD', KEYS[4], expires, key)
    redis.call('HSET', KEYS[5], key, size)
  end
end

local converted = 0
for i = 1, n do
  local old, new = KEYS[ITEMS + i], KEYS[ITEMS + n + i]
  local f = redis.call('HMGET', old, 'value', 'metadata', 'version', 'created', 'updated',
    'expires', 'size')
  if f[1] then
    if redis.call('EXISTS', new) == 0 then
      local expires, size = tonumber(f[6] or '0'), tonumber(f[7] or '0')
      local value = envelope(tonumber(f[3]), tonumber(f[4]), tonumber(f[5]), expires,
        size, f[2] or '', f[1])
      if expires > 0 then
        redis.call('SET', new, value, 'PXAT', expires)
      else
        redis.call('SET', new, value)
      end
      if ARGV[1] == '' then book(ARGV[1 + i], expires, size) end
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
