-- Admit one request across every applicable counter, all or nothing (SPEC §5, §6); with several
-- candidates (a route's targets, SPEC §12), on the first candidate that passes, in one call.
--
-- ARGV: now_ms, request_id, hold_until_ms, reserve (0/1), most_remaining (0/1: candidates tried
--   from the most room down, as `routing.trial_order` ranks them), the number of candidates, then per
--   candidate: its reservation, its number of counters, and per counter: kind ("r" requests,
--   "t" tokens, "c" concurrency slots, "b" budget, "s" soft budget: seeded and read, never
--   checked nor reserved), limit, then (every kind but c) the window's anchor (epoch seconds,
--   as text): where the client last began it anew (a reset, new terms, the store's), which its
--   rolled windows follow; a mark after it, even one before the rolled window's start (a reset
--   just before the client's window rolled), is a window the client has not taken; (c) the
--   client's own requests in flight, which the slots count at the least (Redis may hold none
--   of some: admitted without it, or lost by an empty restart).
-- KEYS, in the same order: r/t/s: the window key and its mark (mark_reset.lua's, carry.lua's);
-- c: the slot ZSET; b: the window key, the reservation ZSET (request id -> expiry), the
-- reservation HASH (request id -> amount) and the mark.
--
-- Returns {"gone"} and takes nothing when its client let this admission go (`unadmit.lua`: the
-- call answered past the client's timeout, whose request was answered 503 or admitted in process);
-- {"fence", ms} while the holds of an emptied Redis are not all back (see below);
-- {"moved", g, at, ...} when a window began anew after it was begun here (at: the mark, a
-- budget's reset's, or carry.lua's for new terms, a budget's or a rate limit's): the client starts
-- that window at the mark and calls again; {"seed", g, ...} when window keys are missing (g: a
-- counter's place among all the candidates' counters, from 1; the client seeds them from the store
-- with SET NX and calls again); {"ok", c, n, <why>..., v1, r1, v2, r2, ...}: candidate c (from 1)
-- admitted, after why each of the n candidates tried before it was refused (c, i, code, used,
-- reserved: the candidate and its refusing counter, from 1), then each of its counters' value and
-- reservations in flight after admission; or {"no", <why>...}: every candidate refused, each one's
-- why in the order tried.
local now = tonumber(ARGV[1])
local request_id = ARGV[2]
local hold_until = tonumber(ARGV[3])
local reserve = ARGV[4] == "1"
local most_remaining = ARGV[5] == "1"

local candidates = {}
local holds = false  -- a candidate takes a slot or a reservation
local k = 1
local a = 7
for _ = 1, tonumber(ARGV[6]) do
  local candidate = {reservation = tonumber(ARGV[a]), reservation_text = ARGV[a], counters = {}}
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, n do
    local c = {kind = ARGV[a], limit = tonumber(ARGV[a + 1]), key = KEYS[k]}
    if c.kind == "c" or (c.kind == "b" and reserve and candidate.reservation > 0) then
      holds = true
    end
    if c.kind == "b" then
      c.rz = KEYS[k + 1]
      c.rh = KEYS[k + 2]
      c.mark = KEYS[k + 3]
      k = k + 4
    elseif c.kind == "c" then
      k = k + 1
    else
      c.mark = KEYS[k + 1]
      k = k + 2
    end
    if c.mark then
      c.anchor = tonumber(ARGV[a + 2])
    else
      c.floor = tonumber(ARGV[a + 2])
    end
    a = a + 3
    candidate.counters[#candidate.counters + 1] = c
  end
  candidates[#candidates + 1] = candidate
end

local moved = {"moved"}
local g = 0
for _, candidate in ipairs(candidates) do
  for _, c in ipairs(candidate.counters) do
    g = g + 1
    if c.mark then
      local at = redis.call("GET", c.mark)
      if at and tonumber(string.match(at, "^%S+")) > c.anchor then
        moved[#moved + 1] = g
        moved[#moved + 1] = at
      end
    end
  end
end
if #moved > 1 then
  return moved
end

-- Redis emptied (restarted without its data) holds none of the slots and reservations of the
-- requests in flight, until each instance's heartbeat writes its own again. A call that finds
-- the instance's mark gone (its start or its last heartbeat set it: Redis lost its data since)
-- sets a fence for twice its heartbeat interval, unless one is up: an admission that would take
-- a slot or a reservation waits it out ({"fence", ms left}), by when the holds are back. Last
-- KEYS: the instance's mark, the fence, then the request's admission mark (`ad:<request id>`);
-- last ARGV: the fence's length (ms), 0 when the instance never set its mark; the number of its
-- last heartbeat Redis answered, and the prefix: a mark with an older beat is a Redis back from
-- an older snapshot, made an empty restart here (`rolled_back`): the windows are seeded below.
local mark, fence, admission = KEYS[#KEYS - 2], KEYS[#KEYS - 1], KEYS[#KEYS]
local marked = redis.call("GET", mark)
if marked and rolled_back(marked, ARGV[a + 1], ARGV[a + 2]) then
  marked = false
end
if ARGV[a] ~= "0" and not marked then
  redis.call("SET", fence, "1", "NX", "PX", ARGV[a])
end
if holds then
  local left = redis.call("PTTL", fence)
  if left > 0 then
    return {"fence", left}
  end
end

local missing = {"seed"}
g = 0
for _, candidate in ipairs(candidates) do
  for _, c in ipairs(candidate.counters) do
    g = g + 1
    if c.kind ~= "c" and redis.call("EXISTS", c.key) == 0 then
      missing[#missing + 1] = g
    end
  end
end
if #missing > 1 then
  return missing
end

-- Reservations and slots of requests that were never settled (a crashed instance) expire here.
local function live_reservations(c)
  local expired = redis.call("ZRANGEBYSCORE", c.rz, "-inf", ARGV[1])
  if #expired > 0 then
    redis.call("HDEL", c.rh, unpack(expired))
    redis.call("ZREMRANGEBYSCORE", c.rz, "-inf", ARGV[1])
  end
  local total = 0
  for _, amount in ipairs(redis.call("HVALS", c.rh)) do
    total = total + tonumber(amount)
  end
  return total
end

-- Rate limits of every scope first, in order, then budgets (exhausted beats reserved); nil when
-- every counter passes, else {i, code, used, reserved} of the refusing one.
local function refusal(counters, reservation)
  for i, c in ipairs(counters) do
    if c.kind == "r" then
      c.value = tonumber(redis.call("GET", c.key))
      if c.value + 1 > c.limit then
        return {i, "request_limit_exceeded", c.value, 0}
      end
    elseif c.kind == "t" then
      c.value = tonumber(redis.call("GET", c.key))
      if c.value >= c.limit then
        return {i, "token_limit_exceeded", c.value, 0}
      end
    elseif c.kind == "c" then
      redis.call("ZREMRANGEBYSCORE", c.key, "-inf", ARGV[1])
      c.value = math.max(redis.call("ZCARD", c.key), c.floor)
      if c.value >= c.limit then
        return {i, "concurrency_limit_exceeded", c.value, 0}
      end
    end
  end
  local held = nil
  for i, c in ipairs(counters) do
    if c.kind == "b" then
      c.value = tonumber(redis.call("GET", c.key))
      c.reserved = live_reservations(c)
      if c.value >= c.limit then
        return {i, "budget_exceeded", c.value, c.reserved}
      end
      if held == nil and reserve and c.reserved > 0
          and c.value + c.reserved + reservation > c.limit then
        held = {i, "budget_reserved", c.value, c.reserved}
      end
    end
  end
  return held
end

-- What a candidate's tightest budget has left: limit - spent - reserved (`routing.room`);
-- unlimited without a budget.
local function room(candidate)
  local least = math.huge
  for _, c in ipairs(candidate.counters) do
    if c.kind == "b" then
      local left = c.limit - tonumber(redis.call("GET", c.key)) - live_reservations(c)
      if left < least then
        least = left
      end
    end
  end
  return least
end

-- The order candidates are tried in: the route's, or the most room first, ties in route order.
local order = {}
for index, candidate in ipairs(candidates) do
  order[index] = index
  if most_remaining then
    candidate.room = room(candidate)
  end
end
if most_remaining then
  table.sort(order, function(x, y)
    local rx, ry = candidates[x].room, candidates[y].room
    if rx ~= ry then
      return rx > ry
    end
    return x < y
  end)
end

-- Numbers go to Redis as the ARGV strings: Lua would print big ones in exponent notation.
-- The admission's mark says which candidate was counted, for a minute: a client that gave up
-- waiting for this call lets go of what it counted (`unadmit.lua`); a mark already there is that
-- client's, which let it go before this call ran (it waited in Redis).
local function take(candidate, index, refused)
  if not redis.call("SET", admission, index, "NX", "PX", 60000) then
    return {"gone"}
  end
  local answer = {"ok", index, (#refused - 1) / 5}
  for n = 2, #refused do
    answer[#answer + 1] = refused[n]
  end
  local hold_ms = math.max(hold_until - now, 1)
  for _, c in ipairs(candidate.counters) do
    if c.kind == "r" then
      c.value = redis.call("INCR", c.key)
    elseif c.kind == "c" then
      redis.call("ZADD", c.key, ARGV[3], request_id)
      redis.call("PEXPIRE", c.key, hold_ms * 2)
      c.value = c.value + 1
    elseif c.kind == "s" then
      c.value = tonumber(redis.call("GET", c.key))
    elseif c.kind == "b" and candidate.reservation > 0 then
      redis.call("HSET", c.rh, request_id, candidate.reservation_text)
      redis.call("ZADD", c.rz, ARGV[3], request_id)
      redis.call("PEXPIRE", c.rh, hold_ms * 2)
      redis.call("PEXPIRE", c.rz, hold_ms * 2)
      c.reserved = c.reserved + candidate.reservation
    end
    answer[#answer + 1] = c.value
    answer[#answer + 1] = c.reserved or 0
  end
  return answer
end

local refused = {"no"}
for _, index in ipairs(order) do
  local candidate = candidates[index]
  local why = refusal(candidate.counters, candidate.reservation)
  if why == nil then
    return take(candidate, index, refused)
  end
  refused[#refused + 1] = index
  for _, part in ipairs(why) do
    refused[#refused + 1] = part
  end
end
return refused
