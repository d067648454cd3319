-- Moves the lines staged for `stream` on its staging list `staged`
-- (see `staging_list`) into packed entries of the stream, at most 64
-- (the buffer's `MAX_RECORDS`) to an entry, oldest first, so that the
-- read after it takes them. It raises no error, which would leave the
-- streams after this one unmarked, and their entries read outside any
-- range: a key of another type is left alone, and the list is deleted
-- only once every entry is added (one added twice is shipped twice,
-- which Loki drops as a duplicate).
local function fold(stream, staged)
  local lines = redis.pcall('LRANGE', staged, 0, -1)
  if lines['err'] or #lines == 0 then return end
  for first = 1, #lines, 64 do
    local last = math.min(first + 63, #lines)
    local added = redis.pcall('XADD', stream, '*', 'records', table.concat(lines, '\n', first, last))
    if type(added) == 'table' and added['err'] then return end
  end
  redis.call('DEL', staged)
end
