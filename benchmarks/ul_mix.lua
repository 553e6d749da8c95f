-- wrk script of benchmarks/ul_mix.py: POST /licensing, each request for one (user, document) pair.
-- Arguments (after `--`): the folder with users.tsv and documents.txt, then "mix" (users uniformly,
-- documents by a Zipf law of exponent S) or "single" (the first user and document every time: best case), then S.
local tokens, racs, docs, cdf = {}, {}, {}, {}
local mode = "mix"

local function read_lines(path)
  local out = {}
  for line in io.lines(path) do out[#out + 1] = line end
  return out
end

init = function(args)
  local dir = args[1]
  mode = args[2] or "mix"
  local s = tonumber(args[3] or "1.0")
  for _, line in ipairs(read_lines(dir .. "/users.tsv")) do
    local token, rac = line:match("^([^\t]+)\t(.+)$")
    tokens[#tokens + 1] = token
    racs[#racs + 1] = rac  -- already escaped for a JSON string
  end
  docs = read_lines(dir .. "/documents.txt")
  local total = 0
  for k = 1, #docs do total = total + 1 / k ^ s; cdf[k] = total end
  for k = 1, #docs do cdf[k] = cdf[k] / total end
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)"), 16) % 100000)
end

local function zipf()
  local u, lo, hi = math.random(), 1, #cdf
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo
end

request = function()
  local user, doc = 1, 1
  if mode == "mix" then user, doc = math.random(#tokens), zipf() end
  local body = '{"pl":"' .. docs[doc] .. '","rac":"' .. racs[user] .. '"}'
  return wrk.format("POST", "/licensing",
                    {["Authorization"] = "Bearer " .. tokens[user], ["Content-Type"] = "application/json"}, body)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK_RESULT %d %d %d %d %d %.3f %.3f %.3f\n", summary.requests, summary.duration, e.status,
                         e.connect + e.read + e.write, e.timeout, latency:percentile(50) / 1000,
                         latency:percentile(95) / 1000, latency:percentile(99) / 1000))
end
