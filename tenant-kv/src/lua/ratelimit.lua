-- Books one unit against every limit given, or against none: a unit that
-- one limit refuses is not counted by the others (an API key over its own
-- rate does not use up its tenant's).
-- KEYS: each limit's state. ARGV: for each, its interval (µs per unit) and
-- burst.
-- Returns, for each limit in order: allowed (1 or 0), remaining, µs until
-- allowed, µs until nothing is booked ahead.
local now_us = clock_us()
local results, tats, all = {}, {}, true
for i, key in ipairs(KEYS) do
  local interval, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local allowed, remaining, retry, reset, tat = gcra_check(key, now_us, interval, burst, 1)
  all = all and allowed
  tats[i] = tat
  local flag = 0
  if allowed then flag = 1 end
  for _, value in ipairs({flag, remaining, retry, reset}) do table.insert(results, value) end
end
if all then
  for i, key in ipairs(KEYS) do
    gcra_book(key, tats[i], tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i]))
  end
end
return results
