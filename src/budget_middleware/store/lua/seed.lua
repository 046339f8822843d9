-- Seed window keys that do not exist yet, each with SET NX: when several instances seed the same
-- window at once, the first value wins and none is added twice. Beside each key it sets, its record
-- says when the seed read the store (the store's clock) and which instance seeded it: an instance
-- paying debts from an outage leaves out what that seed holds of them
-- (`RedisCounters._leave_out_seeded`).
-- Beside the record, the batches on disk that the seed counted (`Spill.others_unwritten`), when
-- any: the debts an engine left naming them are held there (`_held_of_left`).
-- KEYS: window keys, then as many record keys (in the same order), as many keys of the batches
-- counted, then the seeding instance's mark (its heartbeat's).
-- ARGV: per window key its value, ttl_ms (0: the window never ends) and the batches counted (ids,
-- space-separated; "": none); then the record.
-- Returns per key 1 where this value was set, 0 where another was there first; then 1 when the
-- instance's mark is there (Redis has not lost its data since its last heartbeat), else 0; also
-- 0 when the mark reads "0 ...": a heartbeat found it gone, and its answer may not have been
-- read yet (a seed made then counts as one after the loss: `RedisCounters._seeded_after_loss`).
local set = {}
local keys = (#KEYS - 1) / 3
local record = ARGV[3 * keys + 1]
for i = 1, keys do
  local value = ARGV[3 * i - 2]
  local ttl = tonumber(ARGV[3 * i - 1])
  local batches = ARGV[3 * i]
  local done
  if ttl > 0 then
    done = redis.call("SET", KEYS[i], value, "NX", "PX", ttl)
  else
    done = redis.call("SET", KEYS[i], value, "NX")
  end
  if done then
    if ttl > 0 then
      redis.call("SET", KEYS[keys + i], record, "PX", ttl)
    else
      redis.call("SET", KEYS[keys + i], record)
    end
    if batches == "" then
      redis.call("DEL", KEYS[2 * keys + i])
    elseif ttl > 0 then
      redis.call("SET", KEYS[2 * keys + i], batches, "PX", ttl)
    else
      redis.call("SET", KEYS[2 * keys + i], batches)
    end
  end
  set[i] = done and 1 or 0
end
local mark = redis.call("GET", KEYS[#KEYS])
set[keys + 1] = (mark and string.sub(mark, 1, 1) ~= "0") and 1 or 0
return set
