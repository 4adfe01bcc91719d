-- wrk script: POST a fixed JSON body and print a JSON summary line at the end.
-- The body and the Authorization header come from the environment:
--   WRK_BODY     the request body (JSON)
--   WRK_AUTH     optional bearer token
--   WRK_HEADERS  optional extra headers: "Name: value" lines, or a flat JSON object of strings
--                (values without escaped quotes)
--   WRK_UNIQUE   optional mark in WRK_BODY: each request replaces it with a 10-digit counter, so every
--                body differs (a cache miss each; with -t1 the counter is unique within the run, and the
--                caller puts a per-run seed next to the mark). Fixed width: Content-Length stays the same.
wrk.method = "POST"
wrk.body = os.getenv("WRK_BODY") or "{}"
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("WRK_AUTH")
if auth and auth ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. auth
end
local extra = os.getenv("WRK_HEADERS")
if extra and extra ~= "" then
  if extra:match("^%s*{") then
    for name, value in extra:gmatch('"([^"]+)"%s*:%s*"([^"]*)"') do
      wrk.headers[name] = value
    end
  else
    for line in extra:gmatch("[^\r\n]+") do
      local name, value = line:match("^%s*([^:%s]+)%s*:%s*(.-)%s*$")
      if name then
        wrk.headers[name] = value
      end
    end
  end
end

local unique = os.getenv("WRK_UNIQUE")
if unique and unique ~= "" then
  local at = wrk.body:find(unique, 1, true)
  if not at then
    error("WRK_UNIQUE mark not found in WRK_BODY")
  end
  local head, tail = wrk.body:sub(1, at - 1), wrk.body:sub(at + #unique)
  local counter = 0
  function request()
    counter = counter + 1
    return wrk.format(nil, nil, nil, head .. string.format("%010d", counter) .. tail)
  end
end

local function ms(us)
  return us / 1000.0
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_ms": {"p50": %.4f, "p90": %.4f, "p99": %.4f, "max": %.4f, "mean": %.4f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    ms(latency:percentile(50)), ms(latency:percentile(90)), ms(latency:percentile(99)),
    ms(latency.max), ms(latency.mean)))
end
