-- Add a settlement's charges whose settle.lua call failed without an answer, unless it ran
-- (its done key is there): each settlement is added once, whichever call Redis runs first.
-- KEYS[1]: the request's done key; then the window keys; then as many seed records (seed.lua's),
-- in the same order. ARGV: per window key the amount; the client's instance; per window key "1"
-- for a payment's debts whose places the client knows (another instance's seed there may hold
-- some: left to the client, `RedisCounters._leave_out_seeded`) or a settlement's charge the store
-- may hold (committed, or in a write under way: `RedisCounters._committed_before`), else "0".
-- Returns a 0, then the indices (from 1) of window keys the client must seed and add to: those
-- gone now (or, for "1", seeded by another instance) or, when a run before (settle.lua, or
-- reconcile.lua, or this script whose answer was lost) left the done key, those that run found
-- gone (it names them in the done key) and added nothing to.
local n = (#KEYS - 1) / 2
local me = " " .. ARGV[n + 1]
local done = redis.call("GET", KEYS[1])
if done then
  local missing = {0}
  local named = "\n" .. done .. "\n"
  for i = 2, n + 1 do
    if string.find(named, "\n" .. KEYS[i] .. "\n", 1, true) then
      missing[#missing + 1] = i - 1
    end
  end
  return missing
end
local missing = {0}
local missed = {}
local function another_s_seed(i)
  local record = ARGV[n + i] == "1" and redis.call("GET", KEYS[n + i])
  return record and string.sub(record, -#me) ~= me
end
for i = 2, n + 1 do
  if redis.call("EXISTS", KEYS[i]) == 1 and not another_s_seed(i) then
    redis.call("INCRBY", KEYS[i], ARGV[i - 1])
  else
    missing[#missing + 1] = i - 1
    missed[#missed + 1] = KEYS[i]
  end
end
redis.call("SET", KEYS[1], #missed > 0 and table.concat(missed, "\n") or "1", "PX", 60000)
return missing
