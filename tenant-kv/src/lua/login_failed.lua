-- The audit record of a failed login, at most at the tenant's record rate
-- (none when the interval is ''): past it, the failure is only counted,
-- and the next record written says how many were left out (`suppressed`),
-- so an anonymous client guessing passwords cannot push the tenant's other
-- records out of its stream.
-- KEYS: 1 record rate state, 2 count of records left out, 3 audit stream.
-- ARGV: 1 interval (µs per record) or '', 2 burst, 3 audit stream length
--       cap, 4 tenant id, 5 username.
-- Returns 1 if a record was written, 0 if the failure was only counted.
local now_us = clock_us()
if ARGV[1] ~= '' then
  local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
  local allowed, _, _, _, tat = gcra_check(KEYS[1], now_us, interval, burst, 1)
  if not allowed then
    redis.call('INCR', KEYS[2])
    return 0
  end
  gcra_book(KEYS[1], tat, interval, burst)
end
local name = json_text(ARGV[5])
local suppressed = redis.call('GETDEL', KEYS[2])
local suppressed_field = ''
if suppressed then suppressed_field = '","suppressed":"' .. suppressed end
audit_add(KEYS[3], ARGV[3], '{"ts":"' .. ns_text(now_us)
  .. '","action":"login_failed","actor":"user:' .. name .. '","key":"' .. name .. suppressed_field
  .. '","tenant":"' .. ARGV[4] .. '"}')
return 1
