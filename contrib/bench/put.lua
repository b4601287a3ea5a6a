-- wrk script: PUT /v1/kv/k<N> with a JSON body {"value": ..., "request_id": ...}.
--
--   VALUE_BYTES=100 KEYS=10000 wrk -t1 -c64 -d10s -s contrib/bench/put.lua http://127.0.0.1:8001
--
-- RATE (writes per second for each wrk thread; default 0: each connection sends its next write
-- as soon as the last is answered) paces the writes to a schedule instead: a connection whose
-- answer came waits for the next free slot. Slots missed because every connection was waiting
-- for an answer are made up at once while the schedule is less than 100 ms behind, and skipped
-- beyond that. The connections must be enough to carry the rate: more than RATE x latency.
--
-- Every request carries a fresh request_id (as the Python client sends), so the KV state
-- machine's exactly-once table is exercised like in production. At the end the script prints
-- one JSON line: the count of answers by HTTP status (wrk itself only counts >= 400 as errors,
-- and a 307 redirect or a 503 must not pass for a write).

local value = string.rep("v", tonumber(os.getenv("VALUE_BYTES") or "100"))
local keys = tonumber(os.getenv("KEYS") or "10000")
local rate = tonumber(os.getenv("RATE") or "0")
local threads = {}
local counter = 0
local prefix = ""
-- Answers by status, per thread; numbers, because wrk copies only plain values between threads.
local tracked = {200, 307, 400, 404, 413, 500, 503}
s200, s307, s400, s404, s413, s500, s503, sother = 0, 0, 0, 0, 0, 0, 0, 0

wrk.method = "PUT"
wrk.headers["Content-Type"] = "application/json"

function setup(thread)
   thread:set("id", #threads + 1)
   table.insert(threads, thread)
end

function init(args)
   math.randomseed(os.time() + id * 7919)
   prefix = string.format("%d-%d-%08x", id, os.time(), math.random(0, 0x7fffffff))
end

function request()
   counter = counter + 1
   local body = '{"value":"' .. value .. '","request_id":"' .. prefix .. "-" .. counter .. '"}'
   return wrk.format(nil, "/v1/kv/k" .. (counter % keys), nil, body)
end

if rate > 0 then
   -- wrk asks delay() for the milliseconds to wait before each request of a connection.
   local ffi = require("ffi")
   ffi.cdef[[
      typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
      int clock_gettime(int clock, bench_timespec *now);
   ]]
   local CLOCK_MONOTONIC = 1
   local now = ffi.new("bench_timespec")
   local due = nil   -- the next free slot, in seconds on the monotonic clock

   function delay()
      ffi.C.clock_gettime(CLOCK_MONOTONIC, now)
      local t = tonumber(now.tv_sec) + tonumber(now.tv_nsec) * 1e-9
      if due == nil or due < t - 0.1 then
         due = t   -- start, or fell behind: skip the missed slots rather than burst
      end
      local wait = due - t
      due = due + 1 / rate
      return math.max(0, math.floor(wait * 1000))
   end
end

function response(status, headers, body)
   local name = "s" .. status
   if _G[name] ~= nil then
      _G[name] = _G[name] + 1
   else
      sother = sother + 1
   end
end

function done(summary, latency, requests)
   local parts = {}
   for _, status in ipairs(tracked) do
      local total = 0
      for _, thread in ipairs(threads) do
         total = total + thread:get("s" .. status)
      end
      table.insert(parts, string.format('"%d": %d', status, total))
   end
   local other = 0
   for _, thread in ipairs(threads) do
      other = other + thread:get("sother")
   end
   table.insert(parts, string.format('"other": %d', other))
   io.write("STATUSES {" .. table.concat(parts, ", ") .. "}\n")
end
