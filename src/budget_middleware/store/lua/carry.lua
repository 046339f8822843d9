-- New terms for budgets or rate limits (a reset_duration, a budget's calendar_aligned changed)
-- moved their window to a later start within the one before: its usage carries over (SPEC §9),
-- in Redis as in the store. The old window's key, which holds what every instance charged
-- (spend, requests, tokens), is copied to the new window's, and the window is marked as begun
-- there (a budget's reset mark, mark_reset.lua's, or a rate window's own, with " carried"):
-- admit.lua and settle.lua move every instance still charging the old key to the new one, in
-- the same step as the charge, so nothing lands on the old key afterwards.
--
-- New terms whose window would begin before the live one begin with it (the same key): the
-- stored usage that lies in their window, which the live key was not seeded with (it was an
-- older window's), is added to it, once (the mark, at the live window's start, moves nobody).
--
-- Terms that leave the live window where it begins but end it elsewhere (a budget that never
-- reset given a period; a day made a week; a budget that never resets deleted or reset: it ends
-- now, `owner_limits.ended_for_good`) keep its key and seed record as long as that window now.
--
-- KEYS: per window its mark (`redis_counters.mark_key`), the old window's key, the new window's
-- key and its seed record (seed.lua's); a window moved twice before Redis took the first comes
-- twice, in that order, the second from the first's new window. ARGV: per window the new
-- window's start (epoch seconds, as text), the mark's ttl_ms, the new key's ttl_ms (0: none),
-- the amount to add to the new key (0: none), and the stored usage the new window holds once
-- the terms are written. A mark at that moment or later (carried already, or reset since)
-- leaves all as it is but the live key's expiry. An old key gone (Redis emptied) copies nothing,
-- and nothing is added to a new key that is not there: it is seeded from the store. A new key
-- already there was seeded from the store after the terms were written (an instance read them
-- before this carry): it holds that stored usage at least, with the old key's charges the store
-- held then; what the old key holds beyond it is added. Returns nothing.
for i = 1, #KEYS, 4 do
  local a = (i - 1) / 4 * 5 + 1
  local mark, old, new, record = KEYS[i], KEYS[i + 1], KEYS[i + 2], KEYS[i + 3]
  local at, mark_ttl, ttl = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local added, held = ARGV[a + 3], tonumber(ARGV[a + 4])
  local known = redis.call("GET", mark)
  local since = known and tonumber(string.match(known, "^%S+"))
  local ended = since and since > tonumber(at)  -- a reset since (a later mark) ended it
  if old == new and not (ended and ttl == 0) and redis.call("EXISTS", new) == 1 then
    -- The live key and its seed record, kept as long as the new terms' window now: a window
    -- that never ended, given an end (a period; deleted or reset: it ends now), kept them for
    -- good; one made longer lost its key before its end. Terms written again for the same
    -- window (carried there already) set it too; a window a reset has ended since is never
    -- kept for good.
    for _, key in ipairs({new, record}) do
      if ttl > 0 then
        redis.call("PEXPIRE", key, ttl)
      else
        redis.call("PERSIST", key)
      end
    end
  end
  if not since or since < tonumber(at) then
    if old == new then
      -- The new window begins with the live one: the stored usage that lies in it is added.
      if tonumber(added) > 0 and redis.call("EXISTS", new) == 1 then
        redis.call("INCRBY", new, added)
      end
    else
      local value = redis.call("GET", old)
      if value then
        local copied
        if ttl > 0 then
          copied = redis.call("SET", new, value, "NX", "PX", ttl)
        else
          copied = redis.call("SET", new, value, "NX")
        end
        if copied then
          if tonumber(added) > 0 then
            redis.call("INCRBY", new, added)
          end
        else
          local beyond = tonumber(value) + tonumber(added) - held
          if beyond > 0 then
            redis.call("INCRBY", new, string.format("%.0f", beyond))
          end
        end
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
