# -*- test-case-name: tests.test_state_redis -*-
"""
The Lua scripts of the Redis backend: each one operation, atomic in Redis.

Every script reads the time with C{TIME} inside Redis, so all edges share
one clock whatever their own clocks say (Redis 5 and later replicate a
script's effects, so a non-deterministic read before a write is allowed).
Times are milliseconds, except the token bucket's, which are seconds with
microseconds.

Entries with a lifetime of their own inside one key (a tunnel's edges, a
counter's per-edge contributions) sit in a sorted set scored by their expiry
time; scripts drop the members whose time has passed before they read, and
give the key itself a Redis TTL at least as long as its longest-lived member,
so an abandoned key disappears too.

Some scripts reach keys they find in an index (an edge's tunnels): Redis
Cluster would refuse that, so tunneld supports a single Redis or a Sentinel
group, not Redis Cluster.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

__all__ = ["Script"]


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA1 (the name C{EVALSHA} knows it by)."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


_NOW_MS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# Give KEY a TTL of at least TTL milliseconds (a member may outlive another's).
_EXTEND = """
local function extend(key, ttl)
  local left = redis.call('PTTL', key)
  if left < ttl then redis.call('PEXPIRE', key, ttl) end
end
"""

# Drop expired contributions of counter KEYS[1] (hash) / KEYS[2] (expiry zset);
# the sum of the live ones.
_COUNTER = """
local function live_total(values, expiry)
  local dead = redis.call('ZRANGEBYSCORE', expiry, '-inf', now)
  for _, edge in ipairs(dead) do redis.call('HDEL', values, edge) end
  redis.call('ZREMRANGEBYSCORE', expiry, '-inf', now)
  local total = 0
  for _, value in ipairs(redis.call('HVALS', values)) do total = total + tonumber(value) end
  return total
end
"""

# KEYS: edges zset, records hash.  ARGV: edge id, record JSON, ttl ms.
REGISTER_EDGE = Script("register_edge", _NOW_MS + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
""")

# KEYS: edges zset, records hash.  Returns the live records' JSON.
LIVE_EDGES = Script("live_edges", _NOW_MS + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(dead) do redis.call('HDEL', KEYS[2], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local records = {}
for _, id in ipairs(ids) do
  local record = redis.call('HGET', KEYS[2], id)
  if record then table.insert(records, record) end
end
return records
""")

# KEYS: edges zset, records hash, the edge's tunnel index, the edge's counter
# index.  ARGV: edge id, key prefix.
REMOVE_EDGE = Script("remove_edge", """
for _, key in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  redis.call('ZREM', ARGV[2] .. 'tunnel:' .. key, ARGV[1])
end
for _, counter in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  redis.call('HDEL', ARGV[2] .. 'count:' .. counter, ARGV[1])
  redis.call('ZREM', ARGV[2] .. 'count-expiry:' .. counter, ARGV[1])
end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
""")

# KEYS: the edge's tunnel index, then one tunnel zset per tunnel key.
# ARGV: edge id, ttl ms, then the tunnel keys in KEYS' order.
HOLD_TUNNELS = Script("hold_tunnels", _NOW_MS + _EXTEND + """
local ttl = tonumber(ARGV[2])
for i = 2, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[1])
  extend(KEYS[i], ttl)
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i + 1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
extend(KEYS[1], ttl)
return 1
""")

# KEYS: the edge's tunnel index, then one tunnel zset per tunnel key.
# ARGV: edge id, then the tunnel keys in KEYS' order.
RELEASE_TUNNELS = Script("release_tunnels", """
for i = 2, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[i])
end
return 1
""")

# KEYS: a zset scored by expiry.  Its live members.
LIVE_MEMBERS = Script("live_members", _NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
""")

# KEYS: the name's key.  ARGV: identity, ttl ms (0: none).
# {granted, owner, ttl ms left (-1: none)}
CLAIM_NAME = Script("claim_name", """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then
  return {0, owner, redis.call('PTTL', KEYS[1])}
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
  return {1, ARGV[1], ttl}
end
redis.call('SET', KEYS[1], ARGV[1])
return {1, ARGV[1], -1}
""")

# KEYS: the name's key.  ARGV: identity.  1 when it was the identity's.
RELEASE_NAME = Script("release_name", """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
""")

# KEYS: the bucket hash.  ARGV: rate, burst, cost.  The same steps as
# tunneld.state.buckets.refill_and_take, on Redis's clock in seconds.
# {allowed, retry after, tokens left, now}, the last three in millionths as
# integers: a Lua number returned to Redis is cut to an integer, and integer
# replies are what txredisapi parses cheapest (no bulk string).
TAKE_TOKENS = Script("take_tokens", """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local held = redis.call('HMGET', KEYS[1], 't', 's')
local tokens, stamp = tonumber(held[1]), tonumber(held[2])
if tokens == nil or stamp == nil then tokens, stamp = burst, now end
if now > stamp then
  tokens = math.min(burst, tokens + (now - stamp) * rate)
  stamp = now
end
tokens = math.min(tokens, burst)
local allowed, wait = 0, (cost - tokens) / rate
if tokens >= cost then
  tokens = tokens - cost
  allowed, wait = 1, 0
end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 's', string.format('%.17g', stamp))
redis.call('PEXPIRE', KEYS[1], math.min(math.ceil((burst - tokens) / rate * 1000) + 1000, 1e12))
return {allowed, math.ceil(wait * 1000000), math.floor(tokens * 1000000),
        math.floor(now * 1000000)}
""")

# KEYS: counter hash, counter expiry zset, the edge's counter index.
# ARGV: edge id, value, ttl ms, counter name.  The new total.
SET_COUNT = Script("set_count", _NOW_MS + _EXTEND + _COUNTER + """
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('SADD', KEYS[3], ARGV[4])
for i = 1, 3 do extend(KEYS[i], ttl) end
return live_total(KEYS[1], KEYS[2])
""")

# KEYS: as SET_COUNT.  ARGV: edge id, delta, ttl ms, counter name, cap (-1: none).
# {granted, total}
ADJUST_COUNT = Script("adjust_count", _NOW_MS + _EXTEND + _COUNTER + """
local ttl, delta, cap = tonumber(ARGV[3]), tonumber(ARGV[2]), tonumber(ARGV[5])
local total = live_total(KEYS[1], KEYS[2])
local mine = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local new = math.max(0, mine + delta)
if delta > 0 and cap >= 0 and total - mine + new > cap then return {0, total} end
redis.call('HSET', KEYS[1], ARGV[1], new)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('SADD', KEYS[3], ARGV[4])
for i = 1, 3 do extend(KEYS[i], ttl) end
return {1, total - mine + new}
""")

# KEYS: counter hash, counter expiry zset.  The live total.
COUNT_TOTAL = Script("count_total", _NOW_MS + _COUNTER + """
return live_total(KEYS[1], KEYS[2])
""")

# KEYS: the log list, its sequence key.  ARGV: max entries, ttl ms, the
# channel that announces appends, then the entries, in order.
# The event id of the last new entry (its sequence number).
EXTEND_LOG = Script("extend_log", """
local count = #ARGV - 3
for first = 4, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
local seq = redis.call('INCRBY', KEYS[2], count)
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], seq)
return seq
""")

# KEYS: the log list, its sequence key.  ARGV: the last event id to drop.
TRIM_LOG = Script("trim_log", """
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local length = redis.call('LLEN', KEYS[1])
local drop = math.min(length, tonumber(ARGV[1]) - (last - length + 1) + 1)
if drop > 0 then redis.call('LTRIM', KEYS[1], drop, -1) end
return drop
""")

# KEYS: the log list, its sequence key.  ARGV: entries seen (0: none), limit.
# {complete, first event id returned, entries}; {0, 0, {}} for a position the
# log never reached.  Entries are numbered without gaps, so the list index of
# event id N is N - first kept.
READ_LOG = Script("read_log", """
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local seen, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if seen > last then return {0, 0, {}} end
local first = last - redis.call('LLEN', KEYS[1]) + 1
local start = math.max(seen + 1, first)
local complete = 0
if seen + 1 >= first then complete = 1 end
if limit <= 0 then return {complete, start, {}} end
return {complete, start, redis.call('LRANGE', KEYS[1], start - first, start - first + limit - 1)}
""")

ALL = (
    REGISTER_EDGE, LIVE_EDGES, REMOVE_EDGE, HOLD_TUNNELS, RELEASE_TUNNELS, LIVE_MEMBERS,
    CLAIM_NAME, RELEASE_NAME, TAKE_TOKENS, SET_COUNT, ADJUST_COUNT, COUNT_TOTAL,
    EXTEND_LOG, TRIM_LOG, READ_LOG,
)
