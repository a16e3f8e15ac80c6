"""Per-task Redis Streams: the one place that writes a task's event log.

The task store appends each saved event here inside its own MULTI/EXEC, and the event stream
appends what the store did not persist; both use :func:`append_commands`, so an entry always
has the same format (see ``codec.encode_event``), the same cap and the same retention.

Retention: every append trims the stream to about ``maxlen`` entries (``XADD MAXLEN ~``),
and every write to a task sets the stream's TTL: ``terminal_ttl`` once the task is terminal
(the SDK never calls ``destroy()``), ``idle_ttl`` while it is not.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import msgpack  # type: ignore[import-untyped,unused-ignore]
from a2a.server.events.event_queue import Event

from a2a_redis.codec import encode_closed, encode_event
from a2a_redis.keys import Keys
from a2a_redis.transaction import WITH_ENTRY_ID, Command

__all__ = [
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
) -> list[Command]:
    """Commands (for a MULTI) that append ``event`` at ``version`` and wake live subscribers."""
    stream = keys.events(task_id)
    fields: list[bytes] = []
    for name, value in encode_event(version, event).items():
        fields += (name, value)
    return [
        ("XADD", stream, "MAXLEN", "~", retention.maxlen, "*", *fields),
        *retention_commands(keys, task_id, terminal=terminal, retention=retention),
        (keys.publish, keys.wake(task_id), WITH_ENTRY_ID + pack_fields(fields)),
    ]


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


def unpack_wake(data: bytes) -> tuple[bytes, dict[bytes, bytes]] | None:
    """``(entry id, fields)`` from a wake-up that carries its entry, else None."""
    entry_id, sep, packed = data.partition(b"\n")
    if not sep or not entry_id[:1].isdigit():
        return None
    try:
        fields = msgpack.unpackb(packed)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if not isinstance(fields, dict):
        return None
    return entry_id, fields


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
