-- Acknowledges delivered entries of a stream and takes them out of it.
-- KEYS: 1 the stream. ARGV: 1 the group, 2 the id just after the newest
-- of the entries, then the entries' ids.
--
-- A group delivers a stream's entries in order, so when nothing older
-- than the newest of these ids is still pending, every entry up to it has
-- been acknowledged: trimming the stream below ARGV[2] removes them by
-- walking its head. Not past what this node's group delivered, though: a
-- replica promoted before the master's last deliveries reached it would
-- lose entries it never saw delivered (a consumer that read them on the
-- old master may not live to deliver them). XDEL, for the rare case where
-- an older entry is still pending (a consumer that stopped, before its
-- entries are claimed), looks each id up, which costs Redis and every
-- replica several times as much.

-- XACK (with the group) or XDEL of the ids, in chunks: Lua's unpack
-- takes a few thousand values at most.
local CHUNK = 1000
local function with_ids(command)
  for first = 3, #ARGV, CHUNK do
    local last = math.min(first + CHUNK - 1, #ARGV)
    if command == 'XACK' then
      redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, first, last))
    else
      redis.call('XDEL', KEYS[1], unpack(ARGV, first, last))
    end
  end
end

-- Whether id `a` comes before id `b`.
local function before(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  if #a_ms ~= #b_ms then return #a_ms < #b_ms end
  if a_ms ~= b_ms then return a_ms < b_ms end
  return tonumber(a_seq) < tonumber(b_seq)
end

-- The group's last delivered id on this node.
local function last_delivered()
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local fields = {}
    for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
    if fields['name'] == ARGV[1] then return fields['last-delivered-id'] end
  end
end

with_ids('XACK')
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])
if pending[1] == 0 or not before(pending[2], ARGV[2]) then
  local trim_below, delivered = ARGV[2], last_delivered()
  if delivered and before(delivered, trim_below) then
    local ms, seq = string.match(delivered, '^(%d+)-(%d+)$')
    trim_below = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
  end
  redis.call('XTRIM', KEYS[1], 'MINID', trim_below)
else
  with_ids('XDEL')
end
