-- What every script of the store shares; the store sends it ahead of each
-- script's own source.

-- Redis's clock: ms since the epoch, and ns as text (for audit records).
local function clock()
  local time = redis.call('TIME')
  local ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  return ms, time[1] .. string.format('%06d', tonumber(time[2])) .. '000'
end

-- GCRA (the generic cell rate algorithm), for every rate limit: `key`
-- holds the theoretical arrival time (TAT) in ms. Each unit books
-- `interval` ms; at most `burst` units may be booked ahead of now.
-- Returns whether the units were booked, how many more would be now, the
-- ms until they would have been (0 when booked), and the ms until nothing
-- is booked ahead any more.
local function gcra(key, now_ms, interval, burst, cost)
  local limit = interval * burst
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), now_ms)
  local booked = tat + interval * cost
  if booked - now_ms > limit then
    local remaining = math.max(0, math.floor((limit - (tat - now_ms)) / interval))
    return false, remaining, math.ceil(booked - now_ms - limit), math.ceil(tat - now_ms)
  end
  redis.call('SET', key, string.format('%.3f', booked), 'PX', math.ceil(limit) + 1000)
  return true, math.floor((limit - (booked - now_ms)) / interval), 0, math.ceil(booked - now_ms)
end
