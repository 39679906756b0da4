-- wrk script for `make bench-quick`: a fixed offered rate for the whole wrk thread,
-- whatever the latency (wrk2's idea; wrk2 is not packaged in Debian).
--   wrk -t1 -c4 -s bench/fixed_rate.lua URL -- <requests per second>
-- Every request wrk is about to send asks delay() for a slot on one schedule
-- (slot i at start + i / rate); it waits until that slot, so the rate does not depend
-- on how long the variant takes to answer. If the thread falls more than 50 ms behind
-- (it was not scheduled), the schedule restarts from now instead of bursting.
-- wrk's timers have 1 ms resolution; a slot's rounding error never accumulates.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } latchkey_timespec;
int clock_gettime(int clk_id, latchkey_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("latchkey_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local interval_ms = 1.0
local next_slot = nil

function init(args)
  local rate = tonumber(args[1] or "1000")
  interval_ms = 1000 / rate
end

function delay()
  local now = now_ms()
  if next_slot == nil or next_slot < now - 50 then
    next_slot = now
  end
  local wait = next_slot - now
  next_slot = next_slot + interval_ms
  if wait < 0 then
    return 0
  end
  return math.floor(wait)
end
