"""The body of a task save: one ``EVALSHA`` of :data:`SAVE`, inside the save's MULTI.

A save writes the same few things every time: the record's changed fields, the moves of
its ListTasks index entries (one member out of some indexes, another into others), the
event with its wake-up, and the stream's TTL. :data:`SAVE` takes those as positional
arguments, each key and member once, instead of one generic command per write as
``connection/batch.py``'s batch script does (which runs whatever a save also needs now
and then, after them: expiry changes, imported history). Fewer arguments for the client
to pack and the server to parse, fewer script steps per save; the checks are the same:
every zset and stream is checked for its type before anything is written.

``KEYS``: the task's hash, its stream, the ``NB`` indexes where the old member gives way to
the new, the ``NR`` indexes the old member leaves, the ``NA`` indexes the new member
enters (each key once), then the batch's keys.
``ARGV``: the publish command and wake channel, the stream's ``MAXLEN`` and TTL (ms),
``NF NB NR NA NX``, the old and the new member, the wake-up's carried entry, the ``NF``
HSET field/value pairs, the ``NX`` XADD field/value pairs (none: no event), then the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from a2a_redis.connection.batch import BATCH_CHECK, BATCH_RUN, Batch, Script, bulk, pack
from a2a_redis.log.codec import (
    F_OWNER,
    F_SCHEMA,
    F_TASK,
    F_VERSION,
    HEAD_FIELDS,
    RecordHead,
    decode_head,
)
from a2a_redis.log.keys import Keys

__all__ = ["READ_FIELDS", "SAVE", "Frame", "save_batch"]

_LEAD = 12  # ARGV before the HSET pairs
SAVE = Script(
    b"""local nf, nb, nr = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local na, nx = tonumber(ARGV[8]), tonumber(ARGV[9])
local last = 2 + nb + nr + na
for j = nx > 0 and 2 or 3, last do
  local kind = j == 2 and 'stream' or 'zset'
  local held = redis.call('TYPE', KEYS[j])['ok']
  if held ~= 'none' and held ~= kind then
    return redis.error_reply('WRONGTYPE ' .. KEYS[j] .. ' holds a ' .. held .. ', not a ' .. kind)
  end
end
local first = 13 + nf + nx
"""
    + BATCH_CHECK
    + b"""redis.call('HSET', KEYS[1], unpack(ARGV, 13, 12 + nf))
for j = 3, 2 + nb + nr do redis.call('ZREM', KEYS[j], ARGV[10]) end
for j = 3, 2 + nb do redis.call('ZADD', KEYS[j], 0, ARGV[11]) end
for j = 3 + nb + nr, last do redis.call('ZADD', KEYS[j], 0, ARGV[11]) end
if nx > 0 then
  local tail = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
  local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
    unpack(ARGV, 13 + nf, 12 + nf + nx))
  redis.call(ARGV[1], ARGV[2], (tail and tail[1] or '0-0') .. ' ' .. id .. '\\n' .. ARGV[12])
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
"""
    + BATCH_RUN
)
#: The fields ``get`` reads.
READ_FIELDS = (F_SCHEMA, F_OWNER, F_VERSION, F_TASK)
_COUNTS = [bulk(b"%d" % n) for n in range(64)]
_EMPTY = bulk(b"")


def _count(n: int) -> bytes:
    return _COUNTS[n] if n < 64 else bulk(b"%d" % n)


class Frame:
    """One task's keys, packed once: a save's fixed parts; and its last head written."""

    __slots__ = (
        "events", "head", "key", "lead", "packed", "push", "raw", "read", "stream", "watch",
    )  # fmt: skip

    def __init__(self, keys: Keys, task_id: str, maxlen: int) -> None:
        self.key = keys.task(task_id)
        self.raw = self.key.encode()
        self.packed = bulk(self.raw)
        self.push = keys.push_configs(task_id)  # the task's push configs share its lifetime
        self.events = keys.events(task_id)
        self.stream = bulk(self.events.encode())
        #: The head fields (``HEAD_FIELDS``) of the last record this replica wrote, decoded.
        self.head: tuple[list[bytes], RecordHead] | None = None
        #: ARGV 1-3: the publish command, the wake channel, MAXLEN.
        self.lead = b"".join(
            bulk(a.encode()) for a in (keys.publish, keys.wake(task_id), str(maxlen))
        )
        #: WATCH the record, and read its head, in one write.
        self.watch = pack([("WATCH", self.raw), ("HMGET", self.raw, *HEAD_FIELDS)])
        #: Read what ``get`` returns.
        self.read = pack([("HMGET", self.raw, *READ_FIELDS)])

    def decode(self, values: list[bytes | None]) -> RecordHead | None:
        """``codec.decode_head`` of the head read, skipped when it is the one last written."""
        last = self.head
        if last is not None and last[0] == values:
            return last[1]
        return decode_head(self.key, values)

    def wrote(self, record: dict[bytes, bytes], head: RecordHead) -> None:
        """Note a write's ``record`` (all its fields) and its ``head``, in case it commits.

        ``decode_head`` is a function of the bytes read alone, so a head noted for bytes
        that are not the stored ones (a write that lost its race) is never used wrongly.
        """
        self.head = ([record[name] for name in HEAD_FIELDS], head)


def save_batch(
    frame: Frame,
    record: dict[bytes, bytes],
    moves: tuple[Sequence[bytes], Sequence[bytes], Sequence[bytes]],
    members: tuple[bytes, bytes],
    entry: dict[bytes, bytes] | None,
    wake: bytes,
    ttl: bytes,
) -> Batch:
    """The save's body: ``record``'s fields, the index ``moves``, and the event ``entry``.

    ``moves`` are packed index keys: those both members move in (the old one leaves, the
    new one enters), those the old member only leaves, those the new member only enters;
    ``members`` are (old, new). ``wake`` is the wake-up's carried entry
    (``event_log.pack_entry``), ``ttl`` the stream's TTL in ms, as a bulk string. Further
    commands may be added to the returned batch (:meth:`Batch.add`): they run after these.
    """
    both, gone, added = moves
    fields = [bulk(part) for item in record.items() for part in item]
    xadd = [] if entry is None else [bulk(part) for item in entry.items() for part in item]
    args = [
        frame.lead,
        ttl,
        _count(len(fields)),
        _count(len(both)),
        _count(len(gone)),
        _count(len(added)),
        _count(len(xadd)),
        bulk(members[0]) if both or gone else _EMPTY,
        bulk(members[1]) if both or added else _EMPTY,
        bulk(wake) if entry is not None else _EMPTY,
        *fields,
        *xadd,
    ]
    keys = b"".join([frame.packed, frame.stream, *both, *gone, *added])
    count = _LEAD + len(fields) + len(xadd)
    batch = Batch(SAVE, (2 + len(both) + len(gone) + len(added), keys, count, b"".join(args)))
    batch.first_key = frame.raw
    return batch
