"""The Lua scripts of the Redis backplane, and the names of its keys.

Each script runs atomically in Redis: a message is numbered, stored and published in one step,
so ids, history and fan-out order always agree; presence, the room list and the per-address
seats change with the events that announce them.
"""

from __future__ import annotations


class RedisKeys:
    """Every key and channel, under one prefix (`--redis-prefix`)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.lobby = f"{prefix}lobby"  # channel: rooms or members changed somewhere
        self.rooms = f"{prefix}busy_rooms"  # sorted set: room → members, on every process
        self.processes = f"{prefix}processes"  # set of the processes that heartbeat

    def room(self, room: str, what: str) -> str:
        """`events` (channel), `members` (hash), `away` (hash: session digest → client_id),
        `stream`, `last_id`, `epoch`, `client_msg_ids`."""
        return f"{self.prefix}room:{room}:{what}"

    def process(self, process_id: str, what: str) -> str:
        """`alive` (heartbeat), `members` (its room|client entries), `seats` (its addresses)."""
        return f"{self.prefix}process:{process_id}:{what}"

    def seats(self, address: str) -> str:
        return f"{self.prefix}seats:{address}"  # hash: process → sockets from `address`

    def room_of(self, channel: str) -> str | None:
        """The room whose events channel this is, or None."""
        start, end = f"{self.prefix}room:", ":events"
        if channel.startswith(start) and channel.endswith(end):
            return channel[len(start) : -len(end)]
        return None


# Number, store and publish one message. A client_msg_id its sender used before returns the
# original instead. Every key of the room's history lives `ttl` ms past its last message.
APPEND = """
local stream, last_id, epoch, client_msg_ids, channel = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local event, client_msg_id, retention, new_epoch = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local ttl = tonumber(ARGV[5])
redis.call('SET', epoch, new_epoch, 'NX')
if client_msg_id ~= '' then
  local earlier = redis.call('ZSCORE', client_msg_ids, client_msg_id)
  if earlier then
    local entry = redis.call('XRANGE', stream, '0-' .. earlier, '0-' .. earlier)
    if #entry > 0 then return {1, entry[1][2][2]} end
  end
end
local id = redis.call('INCR', last_id)
-- The event arrives encoded without its id: put the id first ('{' + '"id":N,' + the rest).
local text = '{"id":' .. id .. ',' .. string.sub(event, 2)
redis.call('XADD', stream, 'MAXLEN', retention, '0-' .. id, 'e', text)
if client_msg_id ~= '' then
  redis.call('ZADD', client_msg_ids, id, client_msg_id)
  redis.call('ZREMRANGEBYSCORE', client_msg_ids, '-inf', id - retention)
end
if ttl > 0 then
  for _, key in ipairs({stream, last_id, epoch, client_msg_ids}) do redis.call('PEXPIRE', key, ttl) end
end
redis.call('PUBLISH', channel, id .. '\\t\\n' .. text)
return {0, text}
"""

# An epoch made for a room without messages expires too (a visit stores nothing for good).
ROOM_STATE = """
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
else
  redis.call('SET', KEYS[2], ARGV[1], 'NX')
end
return {redis.call('GET', KEYS[2]), tonumber(redis.call('GET', KEYS[1]) or '0')}
"""

# The room's history went back in time (Redis restarted from older data): a new epoch, unless
# another process made one first. KEYS: last_id, epoch; ARGV: the epoch seen, a new one.
NEW_EPOCH = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2], 'KEEPTTL')
end
return {redis.call('GET', KEYS[2]), tonumber(redis.call('GET', KEYS[1]) or '0')}
"""

# Rooms with members are a sorted set scored by their member count: the lobby reads the busiest
# ones without looking at the others.
JOIN = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], redis.call('HLEN', KEYS[1]), ARGV[3])
redis.call('SADD', KEYS[3], ARGV[3] .. '|' .. ARGV[1])
redis.call('PUBLISH', KEYS[4], '')
"""

LEAVE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[2] .. '|' .. ARGV[1])
local left = redis.call('HLEN', KEYS[1])
if left == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) else redis.call('ZADD', KEYS[2], left, ARGV[2]) end
redis.call('PUBLISH', KEYS[4], '')
"""

# Seats: the sockets each process holds for one client address (a hash: process → count).
TAKE_SEAT = """
local cap, total = tonumber(ARGV[2]), 0
for _, count in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(count) end
if cap > 0 and total >= cap then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""

# What this process holds, said anew: its old counts go (some releases may have been lost while
# Redis was away), the ones given (address, count, address, count, ...) are set.
RESTATE_SEATS = """
local mine, process, prefix = KEYS[1], ARGV[1], ARGV[2]
for _, address in ipairs(redis.call('SMEMBERS', mine)) do
  redis.call('HDEL', prefix .. 'seats:' .. address, process)
end
redis.call('DEL', mine)
for i = 3, #ARGV, 2 do
  redis.call('HSET', prefix .. 'seats:' .. ARGV[i], process, ARGV[i + 1])
  redis.call('SADD', mine, ARGV[i])
end
"""

RELEASE_SEAT = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[2])
end
"""

RENAME = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('PUBLISH', KEYS[2], '')
end
"""

# Away members (leave_grace.py) stay in the members hash, their entry saying since when they are
# away (`away`: that absence's mark), until when (`until`, Redis's clock in ms: every process
# reads the same one), which tab (`session`, a digest) and which token user (`identity`).
NOW_MS = """
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
"""

AWAY = (
    NOW_MS
    + """
local entry = cjson.decode(ARGV[2])
entry['until'] = now_ms() + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
redis.call('HSET', KEYS[2], entry['session'], ARGV[1])
"""
)

# A returning tab takes its away entry over: only with the same session, name and token user,
# before the entry's grace ends, and only once (two returns: the second finds nothing).
COME_BACK = (
    NOW_MS
    + """
local members, away, mine, lobby = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local session, name, identity, process, room, prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local client_id = redis.call('HGET', away, session)
if not client_id then return false end
local raw = redis.call('HGET', members, client_id)
if not raw then redis.call('HDEL', away, session) return false end
local entry = cjson.decode(raw)
if name == '' then name = 'User-' .. string.sub(client_id, 1, 8) end
if entry['away'] == nil or entry['session'] ~= session or entry['username'] ~= name
   or entry['identity'] ~= identity or entry['until'] <= now_ms() then return false end
redis.call('HDEL', away, session)
redis.call('SREM', prefix .. 'process:' .. entry['process'] .. ':members', room .. '|' .. client_id)
redis.call('HSET', members, client_id, cjson.encode({username = name, process = process}))
redis.call('SADD', mine, room .. '|' .. client_id)
redis.call('PUBLISH', lobby, '')
return client_id
"""
)

# The absence `mark` ("": any) ends: the member leaves its room, and the room hears it, once.
LEAVE_AWAY = """
local function leave_away(prefix, room, client_id, entry, left)
  local members = prefix .. 'room:' .. room .. ':members'
  redis.call('HDEL', members, client_id)
  local away = prefix .. 'room:' .. room .. ':away'
  if entry['session'] and redis.call('HGET', away, entry['session']) == client_id then
    redis.call('HDEL', away, entry['session'])
  end
  redis.call('SREM', prefix .. 'process:' .. entry['process'] .. ':members', room .. '|' .. client_id)
  local count = redis.call('HLEN', members)
  local rooms = prefix .. 'busy_rooms'
  if count == 0 then redis.call('ZREM', rooms, room) else redis.call('ZADD', rooms, count, room) end
  redis.call('PUBLISH', prefix .. 'room:' .. room .. ':events', '\\t\\n' .. left)
end
"""

END_GRACE = (
    LEAVE_AWAY
    + """
local prefix, room, client_id, mark, left = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local raw = redis.call('HGET', KEYS[1], client_id)
if not raw then return 0 end
local entry = cjson.decode(raw)
if entry['away'] == nil or (mark ~= '' and entry['away'] ~= mark) then return 0 end
leave_away(prefix, room, client_id, entry, left)
redis.call('PUBLISH', KEYS[2], '')
return 1
"""
)

# Remove a dead process's clients from their rooms and tell each room they left; an away one
# stays until its grace ends (a later run takes it), so that its tab may still come back.
REAP = (
    NOW_MS
    + LEAVE_AWAY
    + """
local processes, members_of_dead, alive, lobby = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local dead, timestamp, prefix = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', alive) == 1 then return -1 end
local now, removed, kept = now_ms(), 0, 0
for _, listed in ipairs(redis.call('SMEMBERS', members_of_dead)) do
  local bar = string.find(listed, '|', 1, true)
  local room, client_id = string.sub(listed, 1, bar - 1), string.sub(listed, bar + 1)
  local raw = redis.call('HGET', prefix .. 'room:' .. room .. ':members', client_id)
  local entry = raw and cjson.decode(raw)
  if entry and entry['process'] == dead and entry['away'] ~= nil and entry['until'] > now then
    kept = kept + 1
  elseif entry and entry['process'] == dead then
    local left = cjson.encode({type = 'user_left', username = entry['username'], client_id = client_id,
                               message = entry['username'] .. ' left the room', timestamp = timestamp})
    leave_away(prefix, room, client_id, entry, left)
    removed = removed + 1
  else
    redis.call('SREM', members_of_dead, listed)
  end
end
if kept == 0 then
  redis.call('DEL', members_of_dead)
  redis.call('SREM', processes, dead)
end
local seats_of_dead = prefix .. 'process:' .. dead .. ':seats'
for _, address in ipairs(redis.call('SMEMBERS', seats_of_dead)) do
  redis.call('HDEL', prefix .. 'seats:' .. address, dead)
end
redis.call('DEL', seats_of_dead)
redis.call('PUBLISH', lobby, '')
return removed
"""
)
