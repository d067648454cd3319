-- What every script of the store shares; the store sends it ahead of each
-- script's own source.

-- Redis's clock: ms since the epoch, ns as text (for audit records), and
-- µs (whole numbers, exact in a double for centuries).
local function clock()
  local time = redis.call('TIME')
  local us = tonumber(time[1]) * 1000000 + tonumber(time[2])
  return math.floor(us / 1000), time[1] .. string.format('%06d', tonumber(time[2])) .. '000', us
end

-- GCRA (the generic cell rate algorithm), for every rate limit: `key`
-- holds the theoretical arrival time (TAT), in µs since the epoch. Each
-- unit books `interval` µs (a whole number); at most `burst` units may be
-- booked ahead of now. Everything is counted in whole µs ahead of now, so
-- the sums stay exact.
-- Returns, without booking anything: whether `cost` units would be
-- booked, how many more would be after them (or now, if refused), the µs
-- until they would be (0 when they would), the µs booked ahead once they
-- are (or now, if refused), and the TAT to store to book them.
local function gcra_check(key, now_us, interval, burst, cost)
  local ahead = math.max(tonumber(redis.call('GET', key) or '0') - now_us, 0)
  local limit = interval * burst
  local after = ahead + interval * cost
  if after > limit then
    return false, math.max(0, math.floor((limit - ahead) / interval)), after - limit, ahead, nil
  end
  return true, math.floor((limit - after) / interval), 0, after, now_us + after
end

-- Books what `gcra_check` allowed: the state lives as long as it matters.
local function gcra_book(key, tat, interval, burst)
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil(interval * burst / 1000) + 1000)
end
