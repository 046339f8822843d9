-- Prepended to admit.lua and heartbeat.lua (`redis_counters._script`).
-- Whether Redis came back from an older snapshot (a crash with `save` or `appendfsync
-- everysec`, a failover to a replica behind): the instance's mark (its text) reads a beat number
-- lower than the last beat Redis answered the instance (`floor`, ARGV text; "0": none yet). Its
-- window keys then lack what was charged since the snapshot, and the marks of then are back, so
-- no instance would see a loss. Found so, every key of the prefix is dropped: an empty restart,
-- which each instance recovers from (its mark gone: holds written again, windows seeded from the
-- store, its charges not written owed). Once, by the first call that finds it: the marks go too.
-- The mark's text: "<1, or 0 for a loss found> <beat number>".
local function beat_of(mark)
  return tonumber(string.match(mark, "(%d+)$") or "0")
end

local function rolled_back(mark, floor, prefix)
  if tonumber(floor) == 0 or beat_of(mark) >= tonumber(floor) then
    return false
  end
  local pattern = string.gsub(prefix, "[%*%?%[%]\\]", "\\%0") .. "*"
  local keys = redis.call("KEYS", pattern)
  for i = 1, #keys, 1000 do
    redis.call("DEL", unpack(keys, i, math.min(i + 999, #keys)))
  end
  return true
end
