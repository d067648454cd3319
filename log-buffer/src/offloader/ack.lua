-- Acknowledges a delivered range and trims the stream's head.
-- KEYS: 1 the stream, 2 its in-flight hash. ARGV: 1 the group, 2 the
-- range's first id, 3 its last id, 4 the consumer that delivered it.
--
-- Groups deliver a stream's entries in order, so an entry older than
-- every group's ranges in flight, oldest pending entry and first
-- undelivered entry has been delivered and settled by every group:
-- trimming the stream's head below that bound removes such entries at
-- the cost of a few flags. Taking each group's state on this node also
-- keeps what a replica, promoted before the master's last reads reached
-- it, never saw delivered. Entries settled after an older range still in
-- flight (another instance's that finishes later, or a stopped one's
-- until it is claimed) stay until that range is settled too.
-- A group with a pending list is a user's own reader (of the audit
-- stream, say) or an older offloader; groups of this offloader keep
-- their ranges in their in-flight hash, in the stream's slot.
-- Only the range as this consumer read or claimed it: another consumer
-- may have claimed it since, or (after a failover that lost the read)
-- read again from the same first id up to another last one.
local value = redis.call('HGET', KEYS[2], ARGV[2])
if value then
  local last, _, _, consumer = parse_range(value)
  if last == ARGV[3] and consumer == ARGV[4] then
    redis.call('HDEL', KEYS[2], ARGV[2])
  end
end
local bound
-- Without the group on this node (a replica promoted before it was
-- created), nothing here says what was delivered: no trim.
local own = false
local function lower(id)
  if is_id(id) and (not bound or before(id, bound)) then bound = id end
end
-- Another group's hash is named from the stream's, so it is in the same
-- slot.
for _, fields in ipairs(groups(KEYS[1])) do
  own = own or fields['name'] == ARGV[1]
  for _, first in ipairs(redis.call('HKEYS', KEYS[1] .. ':in-flight:' .. fields['name'])) do
    lower(first)
  end
  if fields['pending'] > 0 then
    lower(redis.call('XPENDING', KEYS[1], fields['name'])[2])
  end
  local undelivered = redis.call('XRANGE', KEYS[1], '(' .. fields['last-delivered-id'], '+', 'COUNT', 1)[1]
  lower(undelivered and undelivered[1])
end
if not own then return end
if bound then
  redis.call('XTRIM', KEYS[1], 'MINID', bound)
else
  redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)
end
