-- Let go of what an admission counted after its client gave up waiting for it (an answer past
-- BUDGET_REDIS_TIMEOUT_SECONDS, or a caller that stopped waiting): that request was answered 503,
-- which counts against no limit (SPEC §5), or admitted in process under fail-open and owed to
-- Redis as such, which counts it once (SPEC §6, §11). Its slots and reservations are let go by
-- settle.lua; its request windows here.
--
-- KEYS: the request's admission mark (admit.lua's `ad:<request id>`), then one candidate's
-- request window keys. ARGV: that candidate's number (from 1).
-- Returns 1 when this candidate had been counted, else 0. The mark is left at "0" for a minute:
-- an admission of the request that runs later still (its call waited in Redis) takes nothing.
local at = redis.call("GET", KEYS[1])
if at and at ~= ARGV[1] then
  return 0  -- another candidate was counted, or the request was let go already
end
redis.call("SET", KEYS[1], "0", "PX", 60000)
if not at then
  return 0
end
for i = 2, #KEYS do
  local value = tonumber(redis.call("GET", KEYS[i]))
  if value and value > 0 then
    redis.call("DECR", KEYS[i])
  end
end
return 1
