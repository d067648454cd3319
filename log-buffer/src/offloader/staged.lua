-- Moves the lines staged for `stream` on its staging list `staged`
-- (see `staging_list`) into packed entries of the stream, at most 64
-- (the buffer's `MAX_RECORDS`) to an entry, oldest first, so that the
-- read after it takes them.
local function fold(stream, staged)
  local lines = redis.call('LRANGE', staged, 0, -1)
  if #lines == 0 then return end
  redis.call('DEL', staged)
  for first = 1, #lines, 64 do
    local last = math.min(first + 63, #lines)
    redis.call('XADD', stream, '*', 'records', table.concat(lines, '\n', first, last))
  end
end
