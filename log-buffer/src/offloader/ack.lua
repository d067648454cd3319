-- Acknowledges delivered entries of a stream and takes them out of it.
-- KEYS: 1 the stream. ARGV: 1 the group, 2 the id just after the newest
-- of the entries, then the entries' ids.
--
-- Groups deliver a stream's entries in order, so an entry older than
-- every group's oldest pending entry and than every group's first
-- undelivered one has been acknowledged by every group: trimming the
-- stream's head below that bound (and below ARGV[2]) removes such entries
-- at the cost of a few flags. Taking each group's state on this node also
-- keeps what a replica, promoted before the master's last deliveries
-- reached it, never saw delivered.
-- When the bound stops short of these entries (an older one is still
-- pending: another offloader's batch that finishes later, or a stopped
-- consumer's before it is claimed) and no other group reads the stream,
-- XDEL removes them: it looks each id up, which costs Redis and every
-- replica several times as much. With another group (a job of the
-- user's reading the audit stream, say), they stay until the bound passes
-- them.

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

-- Whether id `a` comes before id `b`; both parts compared as decimal
-- text, exact whatever their size (Lua's numbers are doubles).
local function before(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  if a_ms ~= b_ms then
    if #a_ms ~= #b_ms then return #a_ms < #b_ms end
    return a_ms < b_ms
  end
  if #a_seq ~= #b_seq then return #a_seq < #b_seq end
  return a_seq < b_seq
end

-- The id of the stream's first entry after `id`, if any.
local function first_after(id)
  local entry = redis.call('XRANGE', KEYS[1], '(' .. id, '+', 'COUNT', 1)[1]
  return entry and entry[1]
end

with_ids('XACK')
local bound = ARGV[2]
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
for _, group in ipairs(groups) do
  local fields = {}
  for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
  if fields['pending'] > 0 then
    local oldest = redis.call('XPENDING', KEYS[1], fields['name'])[2]
    if before(oldest, bound) then bound = oldest end
  end
  local undelivered = first_after(fields['last-delivered-id'])
  if undelivered and before(undelivered, bound) then bound = undelivered end
end
redis.call('XTRIM', KEYS[1], 'MINID', bound)
if bound ~= ARGV[2] and #groups == 1 then with_ids('XDEL') end
