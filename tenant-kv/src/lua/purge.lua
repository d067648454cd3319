-- Takes items whose TTL ran out out of the index, the expiry index and the
-- usage counters, each with a `key_expiration` audit record by `system`:
-- those candidates still in the expiry index, past their time, whose item
-- is gone. Purging twice is harmless: the second finds nothing to do.
-- KEYS: 1 usage, 2 audit, 3 index, 4 expiry, 5 expiring sizes, then each
--       candidate's item key, then (while a migration runs) each one's
--       item key under layout 1.
-- ARGV: 1 tenant id, 2 audit stream length cap, then the candidates' keys.
-- Returns how many were purged.
local candidates = #ARGV - 2
local legacy = #KEYS > 5 + candidates
local now_us = clock_us()
local now_ms, now_ns = math.floor(now_us / 1000), ns_text(now_us)
local purged, bytes = 0, 0
for i = 1, candidates do
  local key = ARGV[2 + i]
  local at = redis.call('ZSCORE', KEYS[4], key)
  if at and tonumber(at) <= now_ms and redis.call('EXISTS', KEYS[5 + i]) == 0
      and not (legacy and redis.call('EXISTS', KEYS[5 + candidates + i]) == 1) then
    local size = tonumber(redis.call('HGET', KEYS[5], key) or '0')
    redis.call('ZREM', KEYS[3], key)
    redis.call('ZREM', KEYS[4], key)
    redis.call('HDEL', KEYS[5], key)
    audit_add(KEYS[2], ARGV[2], '{"ts":"' .. now_ns .. '","action":"key_expiration",'
      .. '"actor":"system","key":"' .. json_text(key) .. '","size":"' .. size .. '","tenant":"'
      .. ARGV[1] .. '","version":""}')
    purged, bytes = purged + 1, bytes + size
  end
end
if purged > 0 then
  redis.call('HINCRBY', KEYS[1], 'keys', -purged)
  redis.call('HINCRBY', KEYS[1], 'bytes', -bytes)
end
return purged
