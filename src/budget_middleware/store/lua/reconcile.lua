-- Add charges this instance admitted while Redis could not be reached to the window keys that
-- Redis kept. A key that is gone (Redis restarted empty, or the window ended) is left alone: it
-- is seeded from the store, which holds those charges, plus what this instance has not written.
-- KEYS: window keys; ARGV: per key the amount to add.
local added = 0
for i, key in ipairs(KEYS) do
  if redis.call("EXISTS", key) == 1 then
    redis.call("INCRBY", key, ARGV[i])
    added = added + 1
  end
end
return added
