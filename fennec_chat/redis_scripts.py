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
        """`events` (channel), `members` (hash), `stream`, `last_id`, `epoch`, `client_msg_ids`."""
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

# Remove a dead process's clients from their rooms and tell each room they left.
REAP = """
local processes, members_of_dead, alive, rooms, lobby = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local dead, timestamp, prefix = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', alive) == 1 then return -1 end
local entries = redis.call('SMEMBERS', members_of_dead)
for _, entry in ipairs(entries) do
  local bar = string.find(entry, '|', 1, true)
  local room, client_id = string.sub(entry, 1, bar - 1), string.sub(entry, bar + 1)
  local members = prefix .. 'room:' .. room .. ':members'
  local member = redis.call('HGET', members, client_id)
  if member then
    redis.call('HDEL', members, client_id)
    local count = redis.call('HLEN', members)
    if count == 0 then redis.call('ZREM', rooms, room) else redis.call('ZADD', rooms, count, room) end
    local name = cjson.decode(member)['username']
    local left = cjson.encode({type = 'user_left', username = name, client_id = client_id,
                               message = name .. ' left the room', timestamp = timestamp})
    redis.call('PUBLISH', prefix .. 'room:' .. room .. ':events', '\\t\\n' .. left)
  end
end
redis.call('DEL', members_of_dead)
local seats_of_dead = prefix .. 'process:' .. dead .. ':seats'
for _, address in ipairs(redis.call('SMEMBERS', seats_of_dead)) do
  redis.call('HDEL', prefix .. 'seats:' .. address, dead)
end
redis.call('DEL', seats_of_dead)
redis.call('SREM', processes, dead)
redis.call('PUBLISH', lobby, '')
return #entries
"""
