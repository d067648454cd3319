-- Moves a tenant's keys other than its items from layout 1
-- (`tenant:<id>:<name>`) to layout 2 (`tenant:{<id>}:<name>`), renamed
-- whole (a stream keeps its consumer groups, a key its TTL), and leaves at
-- layout 1's `expiry` a fence: layout 1's write script reads it first and
-- fails there (WRONGTYPE) before writing anything, so that a server of the
-- previous version still running cannot write where nobody reads any more.
-- A key found under both names (written by such a server after an earlier
-- pass) is merged into layout 2's: sets and sorted sets joined, usage
-- counts added (the version counter the higher), other hash fields added
-- where missing, stream entries appended, strings dropped.
-- Running it again changes nothing.
-- KEYS: pairs (layout 1 name, layout 2 name); the first pair is `expiry`'s.
-- ARGV: 1 the fence's text, 2 its lifetime in ms.
-- Returns {keys moved, keys merged}.
local moved, merged = 0, 0

local function merge(kind, old, new)
  if kind == 'set' then
    redis.call('SUNIONSTORE', new, new, old)
  elseif kind == 'zset' then
    redis.call('ZUNIONSTORE', new, 2, new, old, 'AGGREGATE', 'MAX')
  elseif kind == 'hash' and string.sub(new, -6) == ':usage' then
    -- Both sides counted their own items: add the counts, and let the
    -- next version follow the higher of the two.
    local fields = redis.call('HGETALL', old)
    for i = 1, #fields, 2 do
      local field, count = fields[i], tonumber(fields[i + 1]) or 0
      if field == 'rev' then
        local mine = tonumber(redis.call('HGET', new, 'rev')) or 0
        if count > mine then redis.call('HSET', new, 'rev', count) end
      elseif field == 'keys' or field == 'bytes' then
        redis.call('HINCRBY', new, field, count)
      else
        redis.call('HSETNX', new, field, fields[i + 1])
      end
    end
  elseif kind == 'hash' then
    local fields = redis.call('HGETALL', old)
    for i = 1, #fields, 2 do redis.call('HSETNX', new, fields[i], fields[i + 1]) end
  elseif kind == 'stream' then
    for _, entry in ipairs(redis.call('XRANGE', old, '-', '+')) do
      redis.call('XADD', new, '*', unpack(entry[2]))
    end
  end
end

for i = 1, #KEYS, 2 do
  local old, new = KEYS[i], KEYS[i + 1]
  local kind = redis.call('TYPE', old)['ok']
  local fence = kind == 'string' and i == 1 and redis.call('GET', old) == ARGV[1]
  if kind ~= 'none' and not fence then
    if redis.call('EXISTS', new) == 0 then
      redis.call('RENAME', old, new)
      moved = moved + 1
    else
      merge(kind, old, new)
      redis.call('DEL', old)
      merged = merged + 1
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {moved, merged}
