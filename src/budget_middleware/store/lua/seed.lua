-- Seed window keys that do not exist yet, each with SET NX: when several instances seed the same
-- window at once, the first value wins and none is added twice.
-- KEYS: window keys; ARGV: per key its value and ttl_ms (0: the window never ends).
-- Returns per key 1 where this value was set, 0 where another was there first.
local set = {}
for i, key in ipairs(KEYS) do
  local value = ARGV[2 * i - 1]
  local ttl = tonumber(ARGV[2 * i])
  local done
  if ttl > 0 then
    done = redis.call("SET", key, value, "NX", "PX", ttl)
  else
    done = redis.call("SET", key, value, "NX")
  end
  set[i] = done and 1 or 0
end
return set
