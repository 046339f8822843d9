-- The keys of windows left for good (a reset began a new one, new terms moved it, its limit was
-- deleted), with their seed records: one kept for ever (its window never ended) expires after
-- ARGV[1] ms, the margin any window's key has past its end (late settlements); one that expires
-- already keeps its expiry. KEYS: the keys. Returns nothing.
for _, key in ipairs(KEYS) do
  if redis.call("PTTL", key) == -1 then
    redis.call("PEXPIRE", key, ARGV[1])
  end
end
return 0
