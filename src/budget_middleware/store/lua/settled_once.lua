-- Add a settlement's charges whose settle.lua call failed without an answer, unless it ran
-- (its done key is there): each settlement is added once, whichever call Redis runs first.
-- KEYS[1]: the request's done key; then the window keys. ARGV: per window key the amount.
-- Returns {0} when settle.lua had run (nothing added), else the indices (from 1) of window keys
-- that are gone (the client seeds and adds them), after a 0.
if not redis.call("SET", KEYS[1], "1", "NX", "PX", 60000) then
  return {0}
end
local missing = {0}
for i = 2, #KEYS do
  if redis.call("EXISTS", KEYS[i]) == 1 then
    redis.call("INCRBY", KEYS[i], ARGV[i - 1])
  else
    missing[#missing + 1] = i - 1
  end
end
return missing
