-- New terms for budgets (a reset_duration or calendar_aligned changed) moved their window to a
-- later start within the one before: its usage carries over (SPEC §9), in Redis as in the
-- store. The old window's key, which holds what every instance charged, is copied to the new
-- window's, and the window is marked as begun there (the reset mark, mark_reset.lua's, with
-- " carried"): admit.lua and settle.lua move every instance still charging the old key to the
-- new one, in the same step as the charge, so nothing lands on the old key afterwards.
--
-- KEYS: per budget its mark, the old window's key, the new window's key. ARGV: per budget the
-- new window's start (epoch seconds, as text), the mark's ttl_ms, the new key's ttl_ms (0:
-- none). A mark at that moment or later (carried already, or reset since) leaves all as it is.
-- A new key already there is kept; an old key gone (Redis emptied) copies nothing: the new one
-- is seeded from the store. Returns nothing.
for i = 1, #KEYS, 3 do
  local a = (i - 1) / 3 * 3 + 1
  local mark, old, new = KEYS[i], KEYS[i + 1], KEYS[i + 2]
  local at, mark_ttl, ttl = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local known = redis.call("GET", mark)
  if not known or tonumber(string.match(known, "^%S+")) < tonumber(at) then
    local value = redis.call("GET", old)
    if value then
      if ttl > 0 then
        redis.call("SET", new, value, "NX", "PX", ttl)
      else
        redis.call("SET", new, value, "NX")
      end
    end
    if mark_ttl > 0 then
      redis.call("SET", mark, at .. " carried", "PX", mark_ttl)
    else
      redis.call("SET", mark, at .. " carried")
    end
  end
end
return 0
