-- Acknowledges delivered entries of a stream and takes them out of it.
-- KEYS: 1 the stream. ARGV: 1 the group, then the entries' ids (any order).
--
-- A group delivers a stream's entries in order, so when nothing older
-- than the newest of these ids is still pending, every entry up to it has
-- been acknowledged: trimming the stream up to it removes them by walking
-- its head. XDEL, for the rare case where an older entry is still pending
-- (a consumer that stopped, before its entries are claimed), looks each id
-- up, which costs Redis and every replica several times as much.

-- XACK (with the group) or XDEL of the ids, in chunks: Lua's unpack
-- takes a few thousand values at most.
local CHUNK = 1000
local function with_ids(command)
  for first = 2, #ARGV, CHUNK do
    local last = math.min(first + CHUNK - 1, #ARGV)
    if command == 'XACK' then
      redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, first, last))
    else
      redis.call('XDEL', KEYS[1], unpack(ARGV, first, last))
    end
  end
end

-- An id's milliseconds (as text, exact) and sequence number.
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms, tonumber(seq)
end

-- Whether id `a` comes after id `b`.
local function after(a, b)
  local a_ms, a_seq = parse(a)
  local b_ms, b_seq = parse(b)
  if #a_ms ~= #b_ms then return #a_ms > #b_ms end
  if a_ms ~= b_ms then return a_ms > b_ms end
  return a_seq > b_seq
end

local newest = ARGV[2]
for i = 3, #ARGV do
  if after(ARGV[i], newest) then newest = ARGV[i] end
end
with_ids('XACK')
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])
if pending[1] == 0 or after(pending[2], newest) then
  local ms, seq = parse(newest)
  redis.call('XTRIM', KEYS[1], 'MINID', ms .. '-' .. string.format('%d', seq + 1))
else
  with_ids('XDEL')
end
