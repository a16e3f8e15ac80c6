"""Per-task Redis Streams: the one place that writes a task's event log.

The task store appends each saved event here inside its own MULTI/EXEC, and the event stream
appends what the store did not persist; both use :func:`append_commands`, so an entry always
has the same format (see ``codec.encode_event``), the same cap and the same retention.

Retention: every append trims the stream to about ``maxlen`` entries (``XADD MAXLEN ~``),
and every write to a task sets the stream's TTL: ``terminal_ttl`` once the task is terminal
(the SDK never calls ``destroy()``), ``idle_ttl`` while it is not.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import msgpack  # type: ignore[import-untyped,unused-ignore]
from a2a.server.events.event_queue import Event

from a2a_redis.connection.transaction import BATCH_SCRIPT, WITH_ENTRY_ID, Command
from a2a_redis.log.codec import MAX_PAYLOAD_BYTES, encode_closed, encode_event
from a2a_redis.log.keys import Keys

__all__ = [
    "APPEND_IF_NEW_SCRIPT",
    "DESTROYED",
    "HEARTBEAT",
    "AppendLedger",
    "StreamRetention",
    "append_commands",
    "close_commands",
    "destroy_commands",
    "pack_fields",
    "parse_entry_id",
    "retention_commands",
    "unpack_wake",
]


@dataclass(frozen=True, slots=True)
class StreamRetention:
    """How long a task's event stream lives, and how long it may grow.

    Attributes:
        maxlen: Approximate cap on entries per task (``XADD MAXLEN ~``). Default 10,000.
        terminal_ttl: Seconds the stream is kept after the task's last write in a terminal
            state. Default 3,600 (one hour), long enough for late subscribers to replay.
        idle_ttl: Seconds the stream is kept after the last write to a non-terminal task.
            Default 604,800 (seven days); each write renews it.
    """

    maxlen: int = 10_000
    terminal_ttl: float = 3_600.0
    idle_ttl: float = 7 * 86_400.0

    def __post_init__(self) -> None:
        if self.maxlen < 1 or self.terminal_ttl <= 0 or self.idle_ttl <= 0:
            raise ValueError(f"invalid stream retention {self!r}: every value must be positive")


def retention_commands(
    keys: Keys, task_id: str, *, terminal: bool, retention: StreamRetention
) -> list[Command]:
    """Commands (for a MULTI) that set the stream's TTL after a write to the task."""
    ttl = retention.terminal_ttl if terminal else retention.idle_ttl
    return [("PEXPIRE", keys.events(task_id), int(ttl * 1000))]


def append_commands(
    keys: Keys,
    task_id: str,
    version: int,
    event: Event,
    *,
    terminal: bool,
    retention: StreamRetention,
    max_bytes: int = MAX_PAYLOAD_BYTES,
) -> list[Command]:
    """Commands (for a MULTI) that append ``event`` at ``version`` and wake live subscribers.

    Raises ``PayloadTooLargeError`` if the encoded event is over ``max_bytes``.
    """
    stream = keys.events(task_id)
    fields: list[bytes] = []
    for name, value in encode_event(version, event, key=stream, limit=max_bytes).items():
        fields += (name, value)
    return [
        ("XADD", stream, "MAXLEN", "~", retention.maxlen, "*", *fields),
        *retention_commands(keys, task_id, terminal=terminal, retention=retention),
        (keys.publish, keys.wake(task_id), WITH_ENTRY_ID + pack_fields(fields)),
    ]


#: Runs a batch as ``transaction.BATCH_SCRIPT`` does (its ARGV from the second on), unless
#: the stream KEYS[1] already ends at task version ARGV[1] or later: then the event is a copy
#: of one already logged (the SDK republishes a task it reloaded after losing a race to
#: another replica's write), and the script returns 0 without appending it.
APPEND_IF_NEW_SCRIPT = b"""local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last then
  local fields = last[2]
  for j = 1, #fields, 2 do
    if fields[j] == 'v' then
      if (tonumber(fields[j + 1]) or 0) >= tonumber(ARGV[1]) then return 0 end
      break
    end
  end
end
""" + BATCH_SCRIPT.replace(b"local first = 1\n", b"local first = 2\n", 1)
assert APPEND_IF_NEW_SCRIPT.count(b"local first = 2") == 1

#: Wake payload announcing that a task's stream was destroyed: its subscribers end.
DESTROYED = b"destroyed"
#: Wake payload by which a queue's owner says it is alive (no entry to read).
HEARTBEAT = b"hb"


def close_commands(
    keys: Keys, task_id: str, *, token: bytes, retention: StreamRetention
) -> list[Command]:
    """Commands (for a MULTI) that mark the task's event queue closed and wake its taps.

    ``token`` names the opening of the queue being closed (its lease token).
    """
    stream = keys.events(task_id)
    fields: list[bytes] = []
    for name, value in encode_closed(token).items():
        fields += (name, value)
    return [
        ("XADD", stream, "MAXLEN", "~", retention.maxlen, "*", *fields),
        *retention_commands(keys, task_id, terminal=True, retention=retention),
        (keys.publish, keys.wake(task_id), WITH_ENTRY_ID + pack_fields(fields)),
    ]


def destroy_commands(keys: Keys, task_id: str) -> list[Command]:
    """Commands (for a MULTI) that delete the task's stream and end its live subscribers."""
    return [("UNLINK", keys.events(task_id)), (keys.publish, keys.wake(task_id), DESTROYED)]


def pack_fields(fields: list[bytes]) -> bytes:
    """A stream entry's fields (name, value, ...) as the msgpack map a wake-up carries."""
    packed: bytes = msgpack.packb(dict(zip(fields[::2], fields[1::2], strict=True)))
    return packed


def unpack_wake(data: bytes) -> tuple[bytes, bytes, dict[bytes, bytes]] | None:
    """``(previous entry id, entry id, fields)`` from a wake-up that carries its entry.

    The previous id is that of the stream's last entry before this one ("0-0": none).
    Anything else on the channel (garbage, a foreign message) is None: a bare wake-up.
    """
    ids, sep, packed = data.partition(b"\n")
    prev, space, entry_id = ids.partition(b" ")
    if not (sep and space and _ENTRY_ID.fullmatch(prev) and _ENTRY_ID.fullmatch(entry_id)):
        return None
    try:
        fields = msgpack.unpackb(packed)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if not isinstance(fields, dict) or not all(
        type(k) is bytes and type(v) is bytes for k, v in fields.items()
    ):
        return None
    return prev, entry_id, fields


_ENTRY_ID = re.compile(rb"[0-9]{1,20}-[0-9]{1,20}")


class AppendLedger:
    """Remembers, in process, which (task id, version) events the store already appended.

    The SDK saves an event and then publishes it; publishing it again would append it
    twice. The store records each appended event here and ``RedisTaskEventStream.publish``
    consumes the record, so the usual path costs publish no round trip. Bounded: the oldest
    records go first (a record not consumed only means a redundant append, which
    subscribers drop by version).
    """

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[str, int], None] = OrderedDict()

    def record(self, task_id: str, version: int) -> None:
        """Note that the store appended ``task_id``'s event at ``version``."""
        self._entries[(task_id, version)] = None
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def consume(self, task_id: str, version: int) -> bool:
        """Whether that event was appended (forgetting it)."""
        try:
            del self._entries[(task_id, version)]
        except KeyError:
            return False
        return True


def parse_entry_id(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id ``b"ms-seq"`` as a comparable tuple."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)
