-- wrk script for the varied workloads (bench/workload.py writes the workload file):
--   wrk -t1 -c50 -d10s -s bench/varied.lua URL -- workload-varied.lua [CLOSE_PERMILLE]
-- Every request is built here: a target, a client profile, its own cookie and
-- traceparent, Connection: close for a share, a POST body for a share.  This
-- is RequestGenerator.next_request of bench/workload.py line for line, with
-- the same xorshift32, so for one seed both send the same bytes (a test
-- checks it).  The report is bench/report.lua's done().
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

local bit = require("bit")
local bxor, lshift, rshift, tohex = bit.bxor, bit.lshift, bit.rshift, bit.tohex
local concat, format = table.concat, string.format

local w, x, n, close_permille
local bodies = {}
local threads = 0

function setup(thread)
  thread:set("thread_index", threads)
  threads = threads + 1
end

function init(args)
  w = dofile(args[1])
  close_permille = tonumber(args[2]) or w.close_permille
  local seed = (w.seed + (thread_index or 0) * 7919) % 4294967296
  if seed == 0 then seed = 1 end
  x = bit.tobit(seed)
  n = 0
end

-- xorshift32; the unsigned value as a Lua number
local function next32()
  x = bxor(x, lshift(x, 13))
  x = bxor(x, rshift(x, 17))
  x = bxor(x, lshift(x, 5))
  return x % 4294967296
end

local function pick(t)
  return t[next32() % #t + 1]
end

local function hex8()
  next32()
  return tohex(x, 8)
end

local function body(size)
  local b = bodies[size]
  if not b then
    local p = w.body_pattern
    b = string.rep(p, math.floor(size / #p) + 1):sub(1, size)
    bodies[size] = b
  end
  return b
end

function request()
  n = n + 1
  local close = next32() % 1000 < close_permille
  local is_post = next32() % 1000 < w.post_permille
  local line, post, size
  if is_post then
    post = w.posts[pick(w.post_pick) + 1]
    size = pick(w.sizes)
    line = "POST " .. post.path .. " HTTP/1.1\r\n"
  else
    local target = pick(w.targets)
    if target:sub(-2) == "_=" then
      target = target .. format("%d", 1700000000 + n)
    end
    line = "GET " .. target .. " HTTP/1.1\r\n"
  end
  local profile = w.profiles[pick(w.profile_pick) + 1]
  local sid = hex8() .. hex8() .. hex8()
  local ga = next32() % 1000000000
  local trace = hex8() .. hex8() .. hex8() .. tohex(n, 8)
  local span = hex8() .. hex8()
  local parts = {line, "Host: ", w.vhost, "\r\n", profile.head,
                 "Cookie: sid=", sid, "; _ga=GA1.1.", format("%d", ga), ".", format("%d", 1700000000 + n),
                 "; theme=light\r\n",
                 "traceparent: 00-", trace, "-", span, "-01\r\n"}
  if profile.auth then
    parts[#parts + 1] = "Authorization: Bearer " .. hex8() .. hex8() .. hex8() .. hex8() .. "\r\n"
  end
  if is_post then
    parts[#parts + 1] = "Content-Type: " .. post.type .. "\r\nContent-Length: " .. format("%d", size) .. "\r\n"
  end
  if close then
    parts[#parts + 1] = "Connection: close\r\n"
  elseif profile.keepalive then
    parts[#parts + 1] = "Connection: keep-alive\r\n"
  end
  parts[#parts + 1] = "\r\n"
  if is_post then
    parts[#parts + 1] = body(size)
  end
  return concat(parts)
end
