-- Add charges this instance admitted while Redis could not be reached to the window keys that
-- Redis kept. A key that is gone (Redis restarted empty) is not created here: its index is
-- returned, and the client seeds it from the store, which holds those charges once written,
-- plus what this instance has not written (or adds them, when another instance seeded it).
-- KEYS: window keys; ARGV: per key the amount to add.
local missing = {}
for i, key in ipairs(KEYS) do
  if redis.call("EXISTS", key) == 1 then
    redis.call("INCRBY", key, ARGV[i])
  else
    missing[#missing + 1] = i
  end
end
return missing
