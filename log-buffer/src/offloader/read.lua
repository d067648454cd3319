-- The read of mark.lua, XREADGROUP and record.lua in one script, for
-- when Redis is over `maxmemory` and refuses to queue any transaction:
-- this one copies the entries into Lua and back, about 4 µs per entry
-- on the master, but the offloader goes on draining the streams.
-- KEYS: the streams, then the in-flight hash of each, then the staging
--       list of each, in the same order.
-- ARGV: 1 the group, 2 the consumer, 3 the most entries per stream.
-- Returns what XREADGROUP returns.
local n = #KEYS / 3
for i = 1, n do fold(KEYS[i], KEYS[2 * n + i]) end
local command = {'XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'NOACK', 'STREAMS'}
for i = 1, n do command[#command + 1] = KEYS[i] end
for _ = 1, n do command[#command + 1] = '>' end
local reply = redis.call(unpack(command))
if not reply then return false end
local hashes = {}
for i = 1, n do hashes[KEYS[i]] = KEYS[n + i] end
local since = now_ms()
for _, stream in ipairs(reply) do
  local entries = stream[2]
  if #entries > 0 then
    redis.call('HSET', hashes[stream[1]], entries[1][1],
      range(entries[#entries][1], 1, since, ARGV[2]))
  end
end
return reply
