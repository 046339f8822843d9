-- Add charges this instance made while Redis could not take them to the window keys that Redis
-- kept. A window begun anew elsewhere after the charge's window began and before it ends (its
-- mark, a budget's reset or new terms: mark_reset.lua's, carry.lua's) takes it instead, as in
-- settle.lua: nothing is added, and its index is returned with the mark, for the client to move
-- there and add it again. A key that is gone (Redis restarted empty) is not created here: its
-- index is returned, and the client seeds it from the store, which holds those charges once
-- written, plus what this instance has not written (or adds them, when another instance seeded
-- it).
-- KEYS: per charge its window key and that window's mark; last, the payment's done key. ARGV: per
-- charge the amount, then the window's start and end (epoch seconds, as text).
-- Returns per charge not added its index (from 1), then the mark it moved to, or "" for a key
-- that is gone.
--
-- Its answer may be lost (past the client's timeout) after it added the charges: the client then
-- hands the payment to settled_once.lua, which adds them only if this did not run (the done key,
-- kept a minute, naming the keys this run added nothing to); a late run after that adds nothing.
local done = KEYS[#KEYS]
if redis.call("EXISTS", done) == 1 then
  return {}
end
local answer = {}
local missed = {}
for i = 1, (#KEYS - 1) / 2 do
  local key, mark = KEYS[2 * i - 1], KEYS[2 * i]
  local amount, start, stop = ARGV[3 * i - 2], tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  local at = redis.call("GET", mark)
  local moved = at and tonumber(string.match(at, "^%S+"))
  if moved and start < moved and moved < stop then
    answer[#answer + 1] = i
    answer[#answer + 1] = at
    missed[#missed + 1] = key
  elseif redis.call("EXISTS", key) == 1 then
    redis.call("INCRBY", key, amount)
  else
    answer[#answer + 1] = i
    answer[#answer + 1] = ""
    missed[#missed + 1] = key
  end
end
redis.call("SET", done, #missed > 0 and table.concat(missed, "\n") or "1", "PX", 60000)
return answer
