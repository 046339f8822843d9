-- Add charges this instance made while Redis could not take them to the window keys that Redis
-- kept. A window begun anew elsewhere after the charge's window began and before it ends (its
-- mark, a budget's reset or new terms: mark_reset.lua's, carry.lua's) takes it instead, as in
-- settle.lua: nothing is added, and its index is returned with the mark, for the client to move
-- there and add it again. A key that is gone (Redis restarted empty) is not created here: its
-- index is returned, and the client seeds it from the store, which holds those charges once
-- written, plus what this instance has not written (or adds them, when another instance seeded
-- it).
-- A key seeded by another instance since the client looked at its seed record (seed.lua's) may
-- hold charges of these already (the store had them when that seed read it): nothing is added,
-- and its index is returned with "seeded", for the client to take off what that seed holds and
-- add the rest (`RedisCounters._leave_out_seeded`); added anyway, an outage's charges counted
-- twice (70 of 100 admitted).
-- KEYS: per charge its window key, that window's mark and its seed record; last, the payment's
-- done key. ARGV: per charge the amount, the window's start and end (epoch seconds, as text), and
-- the seed record the client saw ("" for none, "*" for any); last, how long the done key is kept
-- (ms, 0: for ever) and the client's instance.
-- Returns per charge not added its index (from 1), then the mark it moved to, "seeded", or ""
-- for a key that is gone.
--
-- Its answer may be lost (past the client's timeout) after it added the charges: the client then
-- hands the payment to settled_once.lua, which adds them only if this did not run (the done key,
-- kept a minute, naming the keys this run added nothing to); a late run after that adds nothing.
-- Debts an engine left on disk as it stopped are paid under the file's id, the done key kept as
-- long as their windows' keys: a file paid twice (two processes, a crash before its removal) is
-- added once.
local done = KEYS[#KEYS]
if redis.call("EXISTS", done) == 1 then
  return {}
end
local answer = {}
local missed = {}
local me = " " .. ARGV[#ARGV]
local function seeded_since(record, seen)
  if seen == "*" or not record or record == seen then
    return false
  end
  return string.sub(record, -#me) ~= me -- a seed of its own leaves its charges out
end
for i = 1, (#KEYS - 1) / 3 do
  local key, mark, record = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local amount, start, stop = ARGV[4 * i - 3], tonumber(ARGV[4 * i - 2]), tonumber(ARGV[4 * i - 1])
  local at = redis.call("GET", mark)
  local moved = at and tonumber(string.match(at, "^%S+"))
  if moved and start < moved and moved < stop then
    answer[#answer + 1] = i
    answer[#answer + 1] = at
    missed[#missed + 1] = key
  elseif redis.call("EXISTS", key) == 1 then
    if seeded_since(redis.call("GET", record), ARGV[4 * i]) then
      answer[#answer + 1] = i
      answer[#answer + 1] = "seeded"
      missed[#missed + 1] = key
    else
      redis.call("INCRBY", key, amount)
    end
  else
    answer[#answer + 1] = i
    answer[#answer + 1] = ""
    missed[#missed + 1] = key
  end
end
local ttl = tonumber(ARGV[#ARGV - 1])
local value = #missed > 0 and table.concat(missed, "\n") or "1"
if ttl > 0 then
  redis.call("SET", done, value, "PX", ttl)
else
  redis.call("SET", done, value)
end
return answer
