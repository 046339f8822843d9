-- Admit one request across every applicable counter, all or nothing (SPEC §5, §6).
--
-- ARGV: now_ms, request_id, hold_until_ms, reservation, reserve (0/1), then per counter:
--   kind ("r" requests, "t" tokens, "c" concurrency slots, "b" budget), limit.
-- KEYS, in the same order: r/t: the window key; c: the slot ZSET; b: the window key, the
-- reservation ZSET (request id -> expiry) and the reservation HASH (request id -> amount).
--
-- Returns {"seed", i, ...} when window keys are missing (the client seeds them from the store
-- with SET NX and calls again), {"no", i, code, used, reserved} naming the refusing counter, or
-- {"ok", v1, r1, v2, r2, ...}: each counter's value and reservations in flight after admission.
local now = tonumber(ARGV[1])
local request_id = ARGV[2]
local hold_until = tonumber(ARGV[3])
local reservation = tonumber(ARGV[4])
local reserve = ARGV[5] == "1"

local counters = {}
local k = 1
local a = 6
while ARGV[a] do
  local c = {kind = ARGV[a], limit = tonumber(ARGV[a + 1]), key = KEYS[k]}
  if c.kind == "b" then
    c.rz = KEYS[k + 1]
    c.rh = KEYS[k + 2]
    k = k + 3
  else
    k = k + 1
  end
  counters[#counters + 1] = c
  a = a + 2
end

local missing = {"seed"}
for i, c in ipairs(counters) do
  if c.kind ~= "c" and redis.call("EXISTS", c.key) == 0 then
    missing[#missing + 1] = i
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

-- Rate limits of every scope first, in order, then budgets (exhausted beats reserved).
for i, c in ipairs(counters) do
  if c.kind == "r" then
    c.value = tonumber(redis.call("GET", c.key))
    if c.value + 1 > c.limit then
      return {"no", i, "request_limit_exceeded", c.value, 0}
    end
  elseif c.kind == "t" then
    c.value = tonumber(redis.call("GET", c.key))
    if c.value >= c.limit then
      return {"no", i, "token_limit_exceeded", c.value, 0}
    end
  elseif c.kind == "c" then
    redis.call("ZREMRANGEBYSCORE", c.key, "-inf", ARGV[1])
    c.value = redis.call("ZCARD", c.key)
    if c.value >= c.limit then
      return {"no", i, "concurrency_limit_exceeded", c.value, 0}
    end
  end
end
local held = nil
for i, c in ipairs(counters) do
  if c.kind == "b" then
    c.value = tonumber(redis.call("GET", c.key))
    c.reserved = live_reservations(c)
    if c.value >= c.limit then
      return {"no", i, "budget_exceeded", c.value, c.reserved}
    end
    if held == nil and reserve and c.reserved > 0 and c.value + c.reserved + reservation > c.limit then
      held = {"no", i, "budget_reserved", c.value, c.reserved}
    end
  end
end
if held then
  return held
end

-- Numbers go to Redis as the ARGV strings: Lua would print big ones in exponent notation.
local answer = {"ok"}
local hold_ms = math.max(hold_until - now, 1)
for _, c in ipairs(counters) do
  if c.kind == "r" then
    c.value = redis.call("INCR", c.key)
  elseif c.kind == "c" then
    redis.call("ZADD", c.key, ARGV[3], request_id)
    redis.call("PEXPIRE", c.key, hold_ms * 2)
    c.value = c.value + 1
  elseif c.kind == "b" and reservation > 0 then
    redis.call("HSET", c.rh, request_id, ARGV[4])
    redis.call("ZADD", c.rz, ARGV[3], request_id)
    redis.call("PEXPIRE", c.rh, hold_ms * 2)
    redis.call("PEXPIRE", c.rz, hold_ms * 2)
    c.reserved = c.reserved + reservation
  end
  answer[#answer + 1] = c.value
  answer[#answer + 1] = c.reserved or 0
end
return answer
