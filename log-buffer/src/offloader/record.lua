-- After a read, in the same transaction as it and mark.lua before it:
-- what the read returned from each stream, the entries after the marked
-- position up to the group's new one, becomes one range in flight. A
-- replica gets the read and its ranges together, or neither.
-- KEYS: the streams, then the in-flight hash of each, then the staging
--       list of each (mark.lua's keys), in the same order.
-- ARGV: 1 the group, 2 the consumer.
local n = #KEYS / 3
local since = now_ms()
for i = 1, n do
  local marked = redis.call('HGET', KEYS[n + i], MARK)
  if marked then
    redis.call('HDEL', KEYS[n + i], MARK)
    local last = last_delivered(KEYS[i], ARGV[1])
    if last and last ~= marked then
      local first = redis.call('XRANGE', KEYS[i], '(' .. marked, last, 'COUNT', 1)[1]
      if first then
        redis.call('HSET', KEYS[n + i], first[1], range(last, 1, since, ARGV[2]))
      end
    end
  end
end
