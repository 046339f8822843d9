-- Add charges this instance made while Redis could not take them to the window keys that Redis
-- kept. A window begun anew elsewhere after the charge's window began and before it ends (its
-- mark, a budget's reset or new terms: mark_reset.lua's, carry.lua's) takes it instead, as in
-- settle.lua: nothing is added, and its index is returned with the mark, for the client to move
-- there and add it again. A key that is gone (Redis restarted empty) is not created here: its
-- index is returned, and the client seeds it from the store, which holds those charges once
-- written, plus what this instance has not written (or adds them, when another instance seeded
-- it).
-- KEYS: per charge its window key and that window's mark. ARGV: per charge the amount, then the
-- window's start and end (epoch seconds, as text).
-- Returns per charge not added its index (from 1), then the mark it moved to, or "" for a key
-- that is gone.
local answer = {}
for i = 1, #KEYS / 2 do
  local key, mark = KEYS[2 * i - 1], KEYS[2 * i]
  local amount, start, stop = ARGV[3 * i - 2], tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  local at = redis.call("GET", mark)
  local moved = at and tonumber(string.match(at, "^%S+"))
  if moved and start < moved and moved < stop then
    answer[#answer + 1] = i
    answer[#answer + 1] = at
  elseif redis.call("EXISTS", key) == 1 then
    redis.call("INCRBY", key, amount)
  else
    answer[#answer + 1] = i
    answer[#answer + 1] = ""
  end
end
return answer
