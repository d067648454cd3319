-- Before a read (`XREADGROUP ... NOACK`), in the same transaction as it
-- and record.lua after it: notes each stream's group position. The read
-- itself runs outside Lua, as copying its entries into Lua and back
-- would cost the master about 4 µs per entry.
-- Then it moves each stream's staged lines into entries, for the read
-- to take.
-- KEYS: the streams, then the in-flight hash of each, then the staging
--       list of each, in the same order.
-- ARGV: 1 the group.
local n = #KEYS / 3
for i = 1, n do
  local last = last_delivered(KEYS[i], ARGV[1])
  if last then redis.call('HSET', KEYS[n + i], MARK, last) end
  fold(KEYS[i], KEYS[2 * n + i])
end
