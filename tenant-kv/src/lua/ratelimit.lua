-- Books `cost` units against one rate limit.
-- KEYS: 1 the limit's state. ARGV: 1 interval (ms per unit), 2 burst, 3 cost.
-- Returns {booked (1 or 0), remaining, retry after ms, reset ms}.
local booked, remaining, retry, reset =
  gcra(KEYS[1], (clock()), tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
if booked then booked = 1 else booked = 0 end
return {booked, remaining, retry, reset}
