-- Settle one request: drop its reservations and slots, add the actual cost and tokens.
--
-- ARGV: request_id, cost, tokens, then per counter its kind ("t", "c", "b" or "s"), then (every
-- kind but c) its window's anchor (epoch seconds, as text: admit.lua's).
-- KEYS, in the same order: t/s: the window key and its mark; c: the slot ZSET; b: the window
-- key, the reservation ZSET, the reservation HASH and the mark. A soft budget ("s") takes the
-- cost as "b" does.
--
-- Returns {"moved", n, at, ...} and changes nothing when a window it adds to began anew (at: its
-- mark, a budget's reset's or new terms') after it was begun here: what settles now counts in the
-- new window, which the client moves to.
--
-- A window key that does not exist is not created: it has not been seeded from the store yet
-- (new window, emptied Redis), and the charge reaches the store through the flusher; creating it
-- here would make the seed's SET NX fail and lose the store's value.
-- Returns each counter's value after settlement, -1 where the window key was missing.
local request_id = ARGV[1]
local cost = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local moved = {"moved"}
local k = 1
local a = 4
local n = 0
while ARGV[a] do
  n = n + 1
  local kind = ARGV[a]
  if kind ~= "c" then
    local mark = KEYS[k + (kind == "b" and 3 or 1)]
    local at = redis.call("GET", mark)
    local adds = (kind == "t" and tokens or cost) > 0
    if adds and at and tonumber(string.match(at, "^%S+")) > tonumber(ARGV[a + 1]) then
      moved[#moved + 1] = n
      moved[#moved + 1] = at
    end
    k = k + (kind == "b" and 4 or 2)
    a = a + 2
  else
    k = k + 1
    a = a + 1
  end
end
if #moved > 1 then
  return moved
end

-- KEYS[k], after the counters' keys: the request's done key. A settlement that adds runs
-- once: a second run (the client gave up waiting for the first, settled_once.lua ran since)
-- releases and reads, and adds nothing. (A release, adding nothing, passes none.)
local done, mark = KEYS[k], KEYS[k + 1]
if cost > 0 or tokens > 0 then
  if not redis.call("SET", done, "1", "NX", "PX", 60000) then
    cost, tokens = 0, 0
  end
end

local answer = {}
local missed = {}  -- window keys missing, with something to add: named in the done key
k = 1
a = 4
while ARGV[a] do
  local kind = ARGV[a]
  local key = KEYS[k]
  local value = -1
  if kind == "c" then
    redis.call("ZREM", key, request_id)
    value = redis.call("ZCARD", key)
    k = k + 1
  else
    if kind == "b" then
      redis.call("ZREM", KEYS[k + 1], request_id)
      redis.call("HDEL", KEYS[k + 2], request_id)
      k = k + 4
      a = a + 1
    else
      k = k + 2
      a = a + 1
    end
    local amount, text = cost, tostring(cost == 0 and 0 or ARGV[2])
    if kind == "t" then
      amount, text = tokens, tostring(tokens == 0 and 0 or ARGV[3])
    end
    if redis.call("EXISTS", key) == 1 then
      if amount > 0 then
        value = redis.call("INCRBY", key, text)
      else
        value = tonumber(redis.call("GET", key))
      end
    elseif amount > 0 then
      missed[#missed + 1] = key
    end
  end
  answer[#answer + 1] = value
  a = a + 1
end
-- Its answer may be lost (past the client's timeout): settled_once.lua then tells the client
-- which charges this run could not add.
if #missed > 0 then
  redis.call("SET", done, table.concat(missed, "\n"), "PX", 60000)
end
-- KEYS[k + 1], after the done key (a settlement's, not a release's): the instance's mark. Its
-- existence ends the answer (0: Redis lost its data since the instance's last heartbeat, which
-- then owes again what the instance has not written: this charge, added here, is not).
if mark then
  answer[#answer + 1] = redis.call("EXISTS", mark)
end
return answer
