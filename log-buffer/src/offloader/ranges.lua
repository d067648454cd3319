#!lua flags=allow-oom
-- What the offloader's scripts share (each script is this text followed
-- by its own).
--
-- `allow-oom` (Redis 7): over `maxmemory`, a write refused inside
-- read.lua would not undo the read beside it (Redis refuses no read),
-- whose entries would then be in no range; and reading, acknowledging
-- and trimming is how full streams free memory. What the scripts add is
-- a hash field per read.
--
-- The offloader reads with NOACK: no pending list, so Redis propagates
-- one `XGROUP SETID` per read rather than an `XCLAIM` per entry, which
-- cost each replica several microseconds per entry. What a consumer
-- read and has not delivered yet is kept instead as one range per read,
-- in the group's in-flight hash (`<stream>:in-flight:<group>`, in the
-- stream's slot): the field is the range's first id, the value
-- `<last id> <deliveries> <since, ms> <consumer>`.

-- Whether `id` is a stream entry id: a field or value of anything else
-- is passed over.
local function is_id(id)
  return type(id) == 'string' and string.match(id, '^%d+%-%d+$') ~= nil
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

-- The server's clock in milliseconds: every instance claims by the same.
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- A range's value.
local function range(last, deliveries, since, consumer)
  return last .. ' ' .. deliveries .. ' ' .. since .. ' ' .. consumer
end

-- A range's last id, deliveries, since (ms) and consumer; nil for a
-- value that is no range.
local function parse_range(value)
  local last, deliveries, since, consumer = string.match(value, '^(%d+%-%d+) (%d+) (%d+) (.*)$')
  if not last then return nil end
  return last, tonumber(deliveries), tonumber(since), consumer
end

-- The field of an in-flight hash that holds, between mark.lua and
-- record.lua in one transaction, the group's position before the read;
-- no other step ever sees it.
local MARK = '~read'

-- The groups of `stream` on this node, each as a table of its fields
-- (`name`, `pending`, `last-delivered-id`...); none without the stream.
local function groups(stream)
  local reply = redis.pcall('XINFO', 'GROUPS', stream)
  if reply['err'] then return {} end
  local found = {}
  for i, info in ipairs(reply) do
    local fields = {}
    for j = 1, #info, 2 do fields[info[j]] = info[j + 1] end
    found[i] = fields
  end
  return found
end

-- The last id `group` delivered from `stream` on this node, or nil
-- without the stream or the group.
local function last_delivered(stream, group)
  for _, fields in ipairs(groups(stream)) do
    if fields['name'] == group then return fields['last-delivered-id'] end
  end
  return nil
end
