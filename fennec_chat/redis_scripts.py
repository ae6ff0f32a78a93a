"""The Lua scripts of the Redis backplane, and the names of its keys.

Each script runs atomically in Redis: a message is numbered, stored and published in one step,
so ids, history and fan-out order always agree; presence, the room list and the per-address
seats change with the events that announce them.
"""

from __future__ import annotations


class RedisKeys:
    """Every key and channel, under one prefix (`--redis-prefix`).

    On a Redis Cluster a script may only touch the keys of one hash slot, and a sharded channel
    lives on its slot's shard: so each room's keys and channel share the hash tag `{room}`, a
    process's keys `{process}`, an address's seats `{address}`, and the lobby's keys and channel
    `{lobby}`. On one server the names stay as they always were (no tags): its data carries over.
    """

    def __init__(self, prefix: str, cluster: bool = False) -> None:
        self.prefix = prefix
        self.cluster = cluster
        lobby = f"{prefix}{{lobby}}:" if cluster else prefix
        self.lobby = f"{lobby}lobby"  # channel: rooms or members changed somewhere
        self.rooms = f"{lobby}busy_rooms"  # sorted set: room → members, on every process
        self.processes = f"{lobby}processes"  # set of the processes that heartbeat
        # Room events on a cluster go by sharded pub/sub: only the room's shard carries them.
        self.publish = "SPUBLISH" if cluster else "PUBLISH"
        self._scripts: dict[str, str] = {}  # script → itself with PUBLISH chosen, made once

    def _tag(self, name: str) -> str:
        return f"{{{name}}}" if self.cluster else name

    def room(self, room: str, what: str) -> str:
        """`events` (channel), `members` (hash), `away` (hash: session digest → client_id),
        `stream`, `last_id`, `epoch`, `client_msg_ids`, `ban:<username>`."""
        return f"{self.prefix}room:{self._tag(room)}:{what}"

    def process(self, process_id: str, what: str) -> str:
        """`alive` (heartbeat), `members` (its room|client entries), `seats` (its addresses)."""
        return f"{self.prefix}process:{self._tag(process_id)}:{what}"

    def seats(self, address: str) -> str:
        return f"{self.prefix}seats:{self._tag(address)}"  # hash: process → sockets from `address`

    def room_of(self, channel: str) -> str | None:
        """The room whose events channel this is, or None."""
        start, end = f"{self.prefix}room:", ":events"
        if not (channel.startswith(start) and channel.endswith(end)):
            return None
        room = channel[len(start) : -len(end)]
        return room[1:-1] if self.cluster else room

    def script(self, text: str) -> str:
        """A script that publishes with PUBLISH or SPUBLISH, whichever this Redis uses (made
        once: APPEND is asked for on every message)."""
        made = self._scripts.get(text)
        if made is None:
            made = self._scripts[text] = f"local PUBLISH = '{self.publish}'\n{text}"
        return made

    @staticmethod
    def listed(room: str, client_id: str) -> str:
        """A member as a process's `members` set lists it (what a reaper reads back)."""
        return f"{room}|{client_id}"


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
redis.call(PUBLISH, channel, id .. '\\t\\n' .. text)
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

# The room list (the lobby's): rooms with members, scored by their member count, so that the
# lobby reads the busiest without looking at the others. A room's members live in the room's
# slot, the list in the lobby's, so each change of a room's members comes here as a difference:
# additions commute, so two processes' changes may arrive in either order. Then every process
# hears that the lobby changed. KEYS: busy_rooms; ARGV: room, change, the lobby channel.
LOBBY = """
local change = tonumber(ARGV[2])
if change ~= 0 and tonumber(redis.call('ZINCRBY', KEYS[1], change, ARGV[1])) <= 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call(PUBLISH, ARGV[3], '')
"""

# A listed room found without members (a change lost with a failed shard): unlisted, unless its
# count moved since it was read (a join on its way). KEYS: busy_rooms; ARGV: room, count read.
UNLIST_EMPTY = """
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1])) == tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
"""

# Seats: the sockets each process holds for one client address (a hash: process → count).
TAKE_SEAT = """
local cap, total = tonumber(ARGV[2]), 0
for _, count in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(count) end
if cap > 0 and total >= cap then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return 1
"""

RELEASE_SEAT = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
"""

RENAME = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# Away members (leave_grace.py) stay in the members hash, their entry saying since when they are
# away (`away`: that absence's mark), until when (`until`, Redis's clock in ms: every process
# reads the same one), which tab (`session`, a digest) and which token user (`identity`).
# AWAY returns 1 if the member was not listed any more (a reaper took it): it is counted anew.
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
redis.call('HSET', KEYS[2], entry['session'], ARGV[1])
return redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
"""
)

# A returning tab takes its away entry over: only with the same session, name and token user,
# before the entry's grace ends, and only once (two returns: the second finds nothing).
# Returns the client_id and the process that held it. KEYS: members, away.
COME_BACK = (
    NOW_MS
    + """
local members, away = KEYS[1], KEYS[2]
local session, name, identity, process = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local client_id = redis.call('HGET', away, session)
if not client_id then return false end
local raw = redis.call('HGET', members, client_id)
if not raw then redis.call('HDEL', away, session) return false end
local entry = cjson.decode(raw)
if name == '' then name = 'User-' .. string.sub(client_id, 1, 8) end
if entry['away'] == nil or entry['session'] ~= session or entry['username'] ~= name
   or entry['identity'] ~= identity or entry['until'] <= now_ms() then return false end
redis.call('HDEL', away, session)
redis.call('HSET', members, client_id, cjson.encode({username = name, process = process}))
return {client_id, entry['process']}
"""
)

# An away member leaves its room, and the room hears it, once.
LEAVE_AWAY = """
local function leave_away(members, away, channel, client_id, entry, left)
  redis.call('HDEL', members, client_id)
  if entry['session'] and redis.call('HGET', away, entry['session']) == client_id then
    redis.call('HDEL', away, entry['session'])
  end
  redis.call(PUBLISH, channel, '\\t\\n' .. left)
end
"""

# The absence `mark` ("": any) ends. Returns the process that held the member, or false.
# KEYS: members, away; ARGV: the room's events channel, client_id, mark, the user_left event.
END_GRACE = (
    LEAVE_AWAY
    + """
local channel, client_id, mark, left = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local raw = redis.call('HGET', KEYS[1], client_id)
if not raw then return false end
local entry = cjson.decode(raw)
if entry['away'] == nil or (mark ~= '' and entry['away'] ~= mark) then return false end
leave_away(KEYS[1], KEYS[2], channel, client_id, entry, left)
return entry['process']
"""
)

# A dead process's clients in one room leave it, and the room hears each leave once (two
# processes reaping at once: the second finds them gone). An away one stays until its grace
# ends (a later reap takes it), so that its tab may still come back. Returns, per client:
# 0 left, 1 kept (away), 2 no longer the dead process's. KEYS: members, away;
# ARGV: the room's events channel, the dead process, the timestamp, then the client_ids.
REAP_ROOM = (
    NOW_MS
    + LEAVE_AWAY
    + """
local channel, dead, timestamp = ARGV[1], ARGV[2], ARGV[3]
local now, outcome = now_ms(), {}
for i = 4, #ARGV do
  local client_id = ARGV[i]
  local raw = redis.call('HGET', KEYS[1], client_id)
  local entry = raw and cjson.decode(raw)
  if not entry or entry['process'] ~= dead then
    outcome[#outcome + 1] = 2
  elseif entry['away'] ~= nil and entry['until'] > now then
    outcome[#outcome + 1] = 1
  else
    local left = cjson.encode({type = 'user_left', username = entry['username'], client_id = client_id,
                               message = entry['username'] .. ' left the room', timestamp = timestamp})
    leave_away(KEYS[1], KEYS[2], channel, client_id, entry, left)
    outcome[#outcome + 1] = 0
  end
end
return outcome
"""
)

# A reaper forgets what it took of a dead process, unless the process is alive again (only
# paused: it lists its members anew). KEYS: alive, members, seats; ARGV: `entries` and the
# room|client entries taken, `seats` (its seats), or `all` (its members and seats).
FORGET = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[1] == 'all' then redis.call('DEL', KEYS[2], KEYS[3]) return 1 end
if ARGV[1] == 'seats' then redis.call('DEL', KEYS[3]) return 1 end
for i = 2, #ARGV do redis.call('SREM', KEYS[2], ARGV[i]) end
return 1
"""
