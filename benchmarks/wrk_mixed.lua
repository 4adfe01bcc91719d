-- wrk script for the mixed soak (soak_mixed.py): cycles through a mix of requests and counts
-- the answers by status. In every 100 requests:
--   50 whole answers, each body unique (cache misses)       -> 200
--   25 whole answers, one repeated body (cache hits)         -> 200
--   18 streams of 20 chunks, each body unique               -> 200
--    3 unknown models                                        -> 404
--    1 model whose only provider refuses connections         -> 502 after its retries (it cools down)
--    3 bodies whose `messages` is not a list                 -> 400
-- WRK_AUTH: the gateway key; WRK_MODEL, WRK_DOWN_MODEL: model names; WRK_SEED: makes bodies unique per run.
local auth = "Bearer " .. (os.getenv("WRK_AUTH") or "")
local model = os.getenv("WRK_MODEL") or "bench-model"
local down = os.getenv("WRK_DOWN_MODEL") or "bench-down"
local seed = os.getenv("WRK_SEED") or "0"
local headers = {["Content-Type"] = "application/json", ["Authorization"] = auth}
local counter = 0
statuses = {}  -- global: done() reads each thread's copy through thread:get
local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

local function chat(content, stream, name)
  local extra = stream and ', "stream": true' or ""
  return string.format('{"model": "%s", "messages": [{"role": "user", "content": "%s"}]%s}',
    name or model, content, extra)
end

local plan = {}
for i = 1, 50 do plan[#plan + 1] = "miss" end
for i = 1, 25 do plan[#plan + 1] = "hit" end
for i = 1, 18 do plan[#plan + 1] = "stream" end
for i = 1, 3 do plan[#plan + 1] = "unknown" end
plan[#plan + 1] = "down"
for i = 1, 3 do plan[#plan + 1] = "invalid" end

function request()
  counter = counter + 1
  local kind = plan[(counter % #plan) + 1]
  local body
  if kind == "miss" then
    body = chat(string.format("chunks=20 soak %s %d", seed, counter), false)
  elseif kind == "hit" then
    body = chat("chunks=20 soak the same question", false)
  elseif kind == "stream" then
    body = chat(string.format("chunks=20 soak %s %d", seed, counter), true)
  elseif kind == "unknown" then
    body = chat("hi", false, "no-such-model-" .. (counter % 1000))
  elseif kind == "down" then
    body = chat("hi", false, down)
  else
    body = string.format('{"model": "%s", "messages": "not a list"}', model)
  end
  return wrk.format("POST", "/api/chat/completions", headers, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local e = summary.errors
  local total = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do total[status] = (total[status] or 0) + n end
  end
  local parts = {}
  for status, n in pairs(total) do parts[#parts + 1] = string.format('"%d": %d', status, n) end
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"timeout": %d}, "statuses": {%s}, "p99_ms": %.3f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, table.concat(parts, ", "),
    latency:percentile(99) / 1000.0))
end
