-- wrk script: GET /v1/kv/k<N>?consistency=<C> over a key set, spread over several nodes.
--
--   TARGETS=127.0.0.1:8004,127.0.0.1:8005 CONSISTENCY=linearizable KEYS=1000 \
--     wrk -t2 -c16 -d10s -s contrib/bench/read.lua http://127.0.0.1:8004
--
-- Thread i of wrk talks to target i modulo the number of TARGETS (wrk connects each thread to
-- one address), so with as many threads as targets the reads are spread evenly. Keys are
-- chosen at random from k0..k<KEYS-1> (contrib/bench/read_bench.py writes them first). At the
-- end the script prints one JSON line with the count of answers by HTTP status: a 503 from a
-- lagging node must not pass for a read.

local keys = tonumber(os.getenv("KEYS") or "1000")
local consistency = os.getenv("CONSISTENCY") or "linearizable"
local addrs = {}
local threads = {}
local tracked = {200, 307, 404, 503}
s200, s307, s404, s503, sother = 0, 0, 0, 0, 0

function setup(thread)
   if #addrs == 0 then
      for target in string.gmatch(os.getenv("TARGETS") or "", "[^,]+") do
         local host, port = string.match(target, "^(.+):(%d+)$")
         table.insert(addrs, wrk.lookup(host, port)[1])
      end
   end
   table.insert(threads, thread)
   thread:set("id", #threads)
   if #addrs > 0 then
      thread.addr = addrs[(#threads - 1) % #addrs + 1]
   end
end

function init(args)
   math.randomseed(os.time() + id * 7919)
end

function request()
   local path = "/v1/kv/k" .. math.random(0, keys - 1) .. "?consistency=" .. consistency
   return wrk.format("GET", path)
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
