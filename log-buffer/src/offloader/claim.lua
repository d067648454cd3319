-- Claims one in-flight range of a stream for a consumer: one of its own
-- (ARGV[4] = 'own': read before a restart under the same name), or any
-- range in flight for longer than ARGV[3] ms (ARGV[4] = 'idle': its
-- consumer is taken for dead). The range counts one more delivery.
-- KEYS: 1 the stream, 2 its in-flight hash. ARGV: 1 the group, 2 the
-- consumer, 3 the idle time, 4 the mode, 5 the most entries to convert.
-- Returns the range's first id, its deliveries and its entries, or nil.

-- Entries an older offloader read with a pending list become a range,
-- idle at once: they are read again as one (the entries between them
-- that were acknowledged already too; the sink drops such duplicates).
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[5])
if #pending > 0 then
  local ids, deliveries = {}, 1
  for i, entry in ipairs(pending) do
    ids[i] = entry[1]
    deliveries = math.max(deliveries, entry[4])
  end
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('HSET', KEYS[2], ids[1], range(ids[#ids], deliveries, 0, ''))
end

local now = now_ms()
local fields = redis.call('HGETALL', KEYS[2])
for i = 1, #fields, 2 do
  local first = fields[i]
  local last, deliveries, since, consumer = parse_range(fields[i + 1])
  local claimable
  if ARGV[4] == 'own' then
    claimable = consumer == ARGV[2]
  else
    claimable = since + tonumber(ARGV[3]) <= now
  end
  if claimable then
    local entries = redis.call('XRANGE', KEYS[1], first, last)
    if #entries == 0 then
      redis.call('HDEL', KEYS[2], first)
    else
      redis.call('HSET', KEYS[2], first, range(last, deliveries + 1, now, ARGV[2]))
      return {first, deliveries + 1, entries}
    end
  end
end
return false
