-- wrk script: every request carries the next token of the file given after `--`
-- (one token per line), and `done` prints the figures run.py parses (latency in us).
local tokens = {}
local i = 0

init = function(args)
  for line in io.lines(args[1]) do
    if #line > 0 then tokens[#tokens + 1] = line end
  end
  -- threads start at different offsets so they never send the same token together
  i = (tonumber(args[2] or "0") or 0) % #tokens
end

request = function()
  i = i % #tokens + 1
  return wrk.format("GET", "/transactions/7", { ["Authorization"] = "Bearer " .. tokens[i] })
end

done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"status_errors":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.status, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout))
end
