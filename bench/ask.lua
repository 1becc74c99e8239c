-- wrk script for bench/bench.py: one JSON POST per request, then a JSON summary.
--
--   wrk ... <url> -s bench/ask.lua -- <mode> <tag>
--
-- mode "ask":  {"question": "..."} with a new question per request (a cache never hits)
-- mode "same": {"question": "..."} with one constant question (the cache-hit scenario)
-- mode "llm":  an OpenAI chat completion body, to load the fake LLM server directly
--
-- `tag` makes the questions of one run unlike those of every other run.
-- done() prints one line, "BENCH_JSON {...}", that bench.py parses.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("thread_id", #threads)
end

local mode = "ask"
local tag = "bench"
-- Globals, not locals: done() reads them from each thread with thread:get().
sent = 0
received = 0
statuses = {}
local headers = { ["Content-Type"] = "application/json" }

function init(args)
   mode = args[1] or mode
   tag = args[2] or tag
end

local function question()
   if mode == "same" then
      return "What is the capital of France? (" .. tag .. ")"
   end
   -- thread_id is set by setup() in this thread's Lua state before init().
   return string.format("What is the capital of France? (%s %d-%d)", tag, thread_id, sent)
end

function request()
   sent = sent + 1
   local body
   if mode == "llm" then
      body = string.format(
         '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "%s"}]}',
         question()
      )
   else
      body = string.format('{"question": "%s"}', question())
   end
   return wrk.format("POST", nil, headers, body)
end

function response(status, _headers, _body)
   received = received + 1
   local key = tostring(status)
   statuses[key] = (statuses[key] or 0) + 1
end

function done(summary, latency, _requests)
   local total_sent, total_received = 0, 0
   local by_status = {}
   for _, thread in ipairs(threads) do
      total_sent = total_sent + thread:get("sent")
      total_received = total_received + thread:get("received")
      for key, count in pairs(thread:get("statuses")) do
         by_status[key] = (by_status[key] or 0) + count
      end
   end
   local parts = {}
   for key, count in pairs(by_status) do
      table.insert(parts, string.format('"%s": %d', key, count))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests": %d, "duration_us": %d, "sent": %d, "received": %d, '
         .. '"statuses": {%s}, '
         .. '"errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d, "status": %d}, '
         .. '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
      summary.requests, summary.duration, total_sent, total_received,
      table.concat(parts, ", "),
      e.connect, e.read, e.write, e.timeout, e.status,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean
   ))
end
