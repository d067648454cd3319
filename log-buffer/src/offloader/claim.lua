-- Claims one in-flight range of a stream for a consumer: one of its own
-- (ARGV[4] = 'own': read before a restart under the same name), or any
-- range in flight for longer than ARGV[3] ms (ARGV[4] = 'idle': its
-- consumer is taken for dead). The range counts one more delivery.
-- 'idle' also takes this consumer's own ranges whose acknowledgement
-- failed, and ranges converted from a pending list (below).
-- KEYS: 1 the stream, 2 its in-flight hash. ARGV: 1 the group, 2 the
-- consumer, 3 the idle time, 4 the mode, 5 the most entries to return.
-- Returns the range's first id, last id, deliveries and entries, or nil.
-- A range of more entries than ARGV[5] is cut: the rest becomes a range
-- of its own, idle at once, with the same deliveries.

-- Entries an older offloader read with a pending list become a range,
-- idle at once, a batch at a time: they are read again as one (the
-- entries between them that were acknowledged already too; the sink
-- drops such duplicates).
local batch = math.min(tonumber(ARGV[5]), 1000)
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', batch)
if #pending > 0 then
  local ids = {}
  for i, entry in ipairs(pending) do ids[i] = entry[1] end
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('HSET', KEYS[2], ids[1], range(ids[#ids], 1, 0, ''))
end

local now = now_ms()
local fields = redis.call('HGETALL', KEYS[2])
for i = 1, #fields, 2 do
  local first = fields[i]
  local last, deliveries, since, consumer = parse_range(fields[i + 1])
  local claimable = false
  if last and ARGV[4] == 'own' then
    claimable = consumer == ARGV[2]
  elseif last then
    claimable = since + tonumber(ARGV[3]) <= now
  end
  if claimable then
    local entries = redis.call('XRANGE', KEYS[1], first, last, 'COUNT', batch + 1)
    if #entries == 0 then
      redis.call('HDEL', KEYS[2], first)
    else
      if #entries > batch then
        local rest = table.remove(entries)
        redis.call('HSET', KEYS[2], rest[1], range(last, deliveries, 0, consumer))
        last = entries[#entries][1]
      end
      redis.call('HSET', KEYS[2], first, range(last, deliveries + 1, now, ARGV[2]))
      return {first, last, deliveries + 1, entries}
    end
  end
end
return false
