-- Mark budgets reset (`POST /budgets/{id}/reset`) for every instance: an admission that finds a
-- mark newer than its window's start moves that window to it first (admit.lua), so that no
-- instance charges the window the reset ended.
--
-- KEYS: the marks; ARGV: per mark the moment (epoch seconds, as text) and its ttl_ms (0: none).
-- A later moment is never replaced by an earlier one. Returns nothing. (A mark of new terms,
-- carry.lua's, is its moment then " carried": that window's usage carried over from the one
-- before; a reset's keeps the one before's where it was.)
for i, key in ipairs(KEYS) do
  local at = ARGV[2 * i - 1]
  local ttl = tonumber(ARGV[2 * i])
  local known = redis.call("GET", key)
  if not known or tonumber(string.match(known, "^%S+")) < tonumber(at) then
    if ttl > 0 then
      redis.call("SET", key, at, "PX", ttl)
    else
      redis.call("SET", key, at)
    end
  end
end
return 0
