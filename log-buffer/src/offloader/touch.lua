-- Keeps a range this consumer is still delivering (its sink retried)
-- from going idle: its `since` becomes now, so no other consumer claims
-- it and counts a delivery that never failed.
-- KEYS: 1 the in-flight hash. ARGV: 1 the range's first id, 2 its last
-- id, 3 the consumer. Returns whether the range was still this one's.
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return 0 end
local last, deliveries, _, consumer = parse_range(value)
if last ~= ARGV[2] or consumer ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], range(last, deliveries, now_ms(), consumer))
return 1
