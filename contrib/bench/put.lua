-- wrk script: PUT /v1/kv/k<N> with a JSON body {"value": ..., "request_id": ...}.
--
--   VALUE_BYTES=100 KEYS=10000 wrk -t1 -c64 -d10s -s contrib/bench/put.lua http://127.0.0.1:8001
--
-- Every request carries a fresh request_id (as the Python client sends), so the KV state
-- machine's exactly-once table is exercised like in production. At the end the script prints
-- one JSON line: the count of answers by HTTP status (wrk itself only counts >= 400 as errors,
-- and a 307 redirect or a 503 must not pass for a write).

local value = string.rep("v", tonumber(os.getenv("VALUE_BYTES") or "100"))
local keys = tonumber(os.getenv("KEYS") or "10000")
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
