-- Settle one request: drop its reservations and slots, add the actual cost and tokens.
--
-- ARGV: request_id, cost, tokens, then per counter its kind ("t", "c", "b" or "s").
-- KEYS, in the same order: t/s: the window key; c: the slot ZSET; b: the window key, the
-- reservation ZSET and the reservation HASH. A soft budget ("s") takes the cost as "b" does.
--
-- A window key that does not exist is not created: it has not been seeded from the store yet
-- (new window, emptied Redis), and the charge reaches the store through the flusher; creating it
-- here would make the seed's SET NX fail and lose the store's value.
-- Returns each counter's value after settlement, -1 where the window key was missing.
local request_id = ARGV[1]
local cost = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local answer = {}
local k = 1
local a = 4
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
      k = k + 3
    else
      k = k + 1
    end
    local amount, text = cost, ARGV[2]
    if kind == "t" then
      amount, text = tokens, ARGV[3]
    end
    if redis.call("EXISTS", key) == 1 then
      if amount > 0 then
        value = redis.call("INCRBY", key, text)
      else
        value = tonumber(redis.call("GET", key))
      end
    end
  end
  answer[#answer + 1] = value
  a = a + 1
end
return answer
