-- Marks the layout as migrating, unless a migration running beside this
-- one already marked it done.
-- KEYS: 1 the layout marker. ARGV: 1 the migrating value, 2 the done value.
if redis.call('GET', KEYS[1]) ~= ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 0
