-- Seed window keys that do not exist yet, each with SET NX: when several instances seed the same
-- window at once, the first value wins and none is added twice.
-- KEYS: window keys; ARGV: per key its value and ttl_ms (0: the window never ends).
for i, key in ipairs(KEYS) do
  local value = ARGV[2 * i - 1]
  local ttl = tonumber(ARGV[2 * i])
  if ttl > 0 then
    redis.call("SET", key, value, "NX", "PX", ttl)
  else
    redis.call("SET", key, value, "NX")
  end
end
return #KEYS
