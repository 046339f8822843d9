-- Keep this instance's requests in flight held: push out the expiry of their slots and
-- reservations, and put back those Redis lost (it restarted empty while they ran).
--
-- KEYS[1]: this instance's mark (set by the first heartbeat, kept alive by every one: gone
-- means Redis lost its data); the fence; then per hold its key: a slot or reservation ZSET, or a
-- reservation HASH.
-- ARGV: score (the holds' new expiry, ms), key ttl (ms), mark ttl (ms), 1 when the client's
-- beat before got no answer (it may have run: a mark "0 ..." is a loss it found), the fence's
-- length (ms), this beat's number, the number of the last beat Redis answered (0: none), the
-- prefix, then per hold: request id, "z" or "h", the reservation (for "h").
-- The mark reads "<1, or 0 for a loss found> <beat number>", the number never lowered. One
-- lower than the last beat answered: Redis came back from an older snapshot (or a replica
-- behind), whose window keys lack what was charged since: every key of the prefix is dropped
-- (`rolled_back.lua`'s rule), an empty restart, recovered from as one.
-- While the mark is there, only holds still present are pushed out (ZADD XX), never back: a
-- request that settled meanwhile stays released. Without it, every hold is written again (the client then
-- releases those of requests that settled meanwhile).
-- Returns {1 when the mark was gone (or Redis rolled back), else 0; how many holds were written
-- again; 1 when Redis rolled back, else 0}.
local mark = redis.call("GET", KEYS[1])
local rolled = false
if mark and rolled_back(mark, ARGV[7], ARGV[8]) then
  mark, rolled = false, true
end
local lost = (not mark) or (ARGV[4] == "1" and string.sub(mark, 1, 1) == "0")
local beat = tonumber(ARGV[6])
if mark then
  beat = math.max(beat, beat_of(mark))
end
redis.call("SET", KEYS[1], (lost and "0 " or "1 ") .. string.format("%d", beat), "PX", ARGV[3])
-- KEYS[2]: the fence (admit.lua's); ARGV[5]: its length (ms), 0 when the client never set its
-- mark. Found gone, Redis lost its data: admissions that take holds wait until every instance's
-- heartbeat has written its own again.
if not mark and tonumber(ARGV[5]) > 0 then
  redis.call("SET", KEYS[2], "1", "NX", "PX", ARGV[5])
end
local restored = 0
for i = 3, #KEYS do
  local a = 9 + (i - 3) * 3
  local key, id, kind = KEYS[i], ARGV[a], ARGV[a + 1]
  if kind == "z" then
    if lost then
      restored = restored + redis.call("ZADD", key, ARGV[1], id)
    else
      -- Never earlier than it is: a heartbeat delayed behind a later one shortens no hold.
      local held = redis.call("ZSCORE", key, id)
      if held and tonumber(held) < tonumber(ARGV[1]) then
        redis.call("ZADD", key, "XX", ARGV[1], id)
      end
    end
  elseif lost then
    redis.call("HSET", key, id, ARGV[a + 2])
  end
  redis.call("PEXPIRE", key, ARGV[2])
end
return {lost and 1 or 0, restored, rolled and 1 or 0}
