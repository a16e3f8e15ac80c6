"""A task's event log: its Redis Stream, the wake-ups that announce it, and how both are read.

Writers: the task store appends each saved event inside its own MULTI/EXEC, the event stream
appends what the store did not persist, and the legacy queue manager appends its queue's
events and close mark; all use the commands built here, so an entry always has the same
format (``codec.encode_event``), the same cap and the same retention, and its wake-up
carries it. Readers (the event stream's backlog, the listener's live fetches, a lagging
subscriber's catch-up) use :func:`read_entries`, :func:`decode_rows` and
:func:`check_not_trimmed`: an entry that does not decode becomes a :class:`StreamEntry`
with its typed error, never a silent skip.

Retention: every append trims the stream to about ``maxlen`` entries (``XADD MAXLEN ~``),
and every write to a task sets the stream's TTL: ``terminal_ttl`` once the task is terminal
(the SDK never calls ``destroy()``), ``idle_ttl`` while it is not.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack  # type: ignore[import-untyped,unused-ignore]
from a2a.server.events.event_queue import Event
from redis import exceptions as rex

from a2a_redis import telemetry
from a2a_redis.connection.cluster import Client
from a2a_redis.connection.transaction import BATCH_BODY, WITH_ENTRY_ID, Command
from a2a_redis.errors import CorruptDataError, SubscriberLagError
from a2a_redis.log.codec import (
    E_CONTEXT,
    MAX_PAYLOAD_BYTES,
    decode_event,
    encode_closed,
    encode_event,
    entry_version_hint,
)
from a2a_redis.log.keys import Keys

__all__ = [
    "APPEND_IF_NEW_SCRIPT",
    "DESTROYED",
    "FETCH_BATCH",
    "HEARTBEAT",
    "AppendLedger",
    "Position",
    "Rows",
    "StreamEntry",
    "StreamRetention",
    "append_commands",
    "carried_entry",
    "check_not_trimmed",
    "close_commands",
    "decode_rows",
    "destroy_commands",
    "format_position",
    "pack_entry",
    "pack_fields",
    "parse_entry_id",
    "read_entries",
    "retention_commands",
    "share_view",
    "unpack_wake",
]

logger = logging.getLogger(__name__)


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
    fields = encode_event(version, event, key=keys.events(task_id), limit=max_bytes)
    return _entry_commands(keys, task_id, fields, terminal=terminal, retention=retention)


def close_commands(
    keys: Keys, task_id: str, *, token: bytes, retention: StreamRetention
) -> list[Command]:
    """Commands (for a MULTI) that mark the task's event queue closed and wake its taps.

    ``token`` names the opening of the queue being closed (its lease token).
    """
    return _entry_commands(keys, task_id, encode_closed(token), terminal=True, retention=retention)


def _entry_commands(
    keys: Keys,
    task_id: str,
    entry: dict[bytes, bytes],
    *,
    terminal: bool,
    retention: StreamRetention,
) -> list[Command]:
    """XADD ``entry`` (capped), set the stream's TTL, and publish a wake-up carrying it."""
    fields = [part for item in entry.items() for part in item]
    return [
        ("XADD", keys.events(task_id), "MAXLEN", "~", retention.maxlen, "*", *fields),
        *retention_commands(keys, task_id, terminal=terminal, retention=retention),
        (keys.publish, keys.wake(task_id), WITH_ENTRY_ID + pack_fields(fields)),
    ]


#: Runs a batch as ``transaction.BATCH_SCRIPT`` does (its ARGV from the second on), unless
#: the stream KEYS[1] already ends at task version ARGV[1] or later: then the event is a copy
#: of one already logged (the SDK republishes a task it reloaded after losing a race to
#: another replica's write), and the script returns 0 without appending it.
APPEND_IF_NEW_SCRIPT = (
    b"""local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last then
  local fields = last[2]
  for j = 1, #fields, 2 do
    if fields[j] == 'v' then
      if (tonumber(fields[j + 1]) or 0) >= tonumber(ARGV[1]) then return 0 end
      break
    end
  end
end
local first = 2
"""
    + BATCH_BODY
)

#: Wake payload announcing that a task's stream was destroyed: its subscribers end.
DESTROYED = b"destroyed"
#: Wake payload by which a queue's owner says it is alive (no entry to read).
HEARTBEAT = b"hb"


def destroy_commands(keys: Keys, task_id: str) -> list[Command]:
    """Commands (for a MULTI) that delete the task's stream and end its live subscribers."""
    return [("UNLINK", keys.events(task_id)), (keys.publish, keys.wake(task_id), DESTROYED)]


def pack_fields(fields: list[bytes]) -> bytes:
    """A stream entry's fields (name, value, ...) as the msgpack map a wake-up carries."""
    return pack_entry(dict(zip(fields[::2], fields[1::2], strict=True)))


def pack_entry(entry: dict[bytes, bytes]) -> bytes:
    """A stream entry's fields as the msgpack map a wake-up carries."""
    packed: bytes = msgpack.packb(entry)
    return packed


def carried_entry(key: str, data: bytes, last: Position) -> tuple[bool, StreamEntry | None]:
    """The entry a wake-up carries, if it can be trusted to follow ``last`` directly.

    Every append publishes its entry in the same script as the XADD, with the id of the
    entry it follows, and pub/sub delivers in order. So a carried entry that follows
    ``last`` exactly is the next entry; one after a gap (an entry added without a wake-up)
    is not trusted, so that the gap is read, not jumped over. Returns ``(False, None)``:
    not trusted (no entry, a gap, an undecodable entry): read the stream;
    ``(True, None)``: nothing new; ``(True, entry)``: the next entry.
    """
    carried = unpack_wake(data)
    if carried is None:
        return False, None
    prev, entry_id, fields = carried
    position = parse_entry_id(entry_id)
    if position <= last:
        return True, None
    if parse_entry_id(prev) != last:
        return False, None
    try:
        version, event = decode_event(key, fields)
    except CorruptDataError as e:  # not trusted: the stream itself decides
        logger.warning("%s: a wake-up carries an unreadable entry (%s)", key, e.reason)
        return False, None
    return True, StreamEntry(position, version, event, context=fields.get(E_CONTEXT))


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


# -- reading -----------------------------------------------------------------------------
FETCH_BATCH = 512  # entries per XRANGE
#: A stream entry's id as a comparable ``(ms, seq)``.
Position = tuple[int, int]
#: XRANGE rows: ``(entry id, fields)``.
Rows = list[tuple[bytes, dict[bytes, bytes]]]


def parse_entry_id(entry_id: bytes) -> Position:
    """A stream entry id ``b"ms-seq"`` as a comparable tuple."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One decoded stream entry (or, with ``error`` set, one that could not be decoded)."""

    position: Position
    version: int  # -1: unknown (an undecodable entry whose version could not be read)
    event: Event | None  # None: the task's event queue was closed here, or ``error``
    error: CorruptDataError | None = None
    context: bytes | None = None  # writer's clock and traceparent (``telemetry``), if any
    #: What every local reader of the entry would derive from it alike (the event
    #: stream's ``VersionedEvent``), made once by the first and shared: fan-out to N
    #: subscribers allocates nothing per subscriber. Set with :func:`share_view`.
    view: Any = field(default=None, compare=False, repr=False)


def share_view(entry: StreamEntry, view: object) -> None:
    """Keep ``view`` on ``entry`` for the entry's other readers (see ``StreamEntry.view``)."""
    object.__setattr__(entry, "view", view)  # a cache on a frozen entry: set once, never read back


def format_position(position: Position) -> str:
    """A position as a stream entry id."""
    return f"{position[0]}-{position[1]}"


def decode_rows(key: str, rows: Rows) -> list[StreamEntry]:
    """Decode XRANGE rows.

    An undecodable entry becomes a :class:`StreamEntry` carrying the typed error (naming
    the key and the entry id; its version if that much can be read, else -1), logged at
    WARNING without its bytes: readers decide what it means for them.
    """
    out = []
    for entry_id, fields in rows:
        position = parse_entry_id(entry_id)
        try:
            version, event = decode_event(key, fields)
        except CorruptDataError as e:
            where = format_position(position)
            logger.warning("%s: stream entry %s cannot be read: %s", key, where, e.reason)
            error = type(e)(f"stream entry {where} cannot be read: {e.reason}", key=key)
            out.append(StreamEntry(position, entry_version_hint(fields), None, error))
            continue
        out.append(StreamEntry(position, version, event, context=fields.get(E_CONTEXT)))
    return out


async def read_entries(
    redis: Client, key: str, after: Position, *, check_trim: bool = False, count: int = FETCH_BATCH
) -> tuple[list[StreamEntry], Position]:
    """Entries after ``after`` (one batch of ``count``), and the position of the last row read.

    With ``check_trim`` (one more round trip), raises :class:`SubscriberLagError` if
    entries after ``after`` were trimmed away before they could be read.
    """
    rows = cast(
        Rows, await redis.xrange(key, min="(" + format_position(after), max="+", count=count)
    )
    if check_trim and after != (0, 0):
        await check_not_trimmed(redis, key, after)
    last = parse_entry_id(rows[-1][0]) if rows else after
    return decode_rows(key, rows), last


async def check_not_trimmed(redis: Client, key: str, after: Position) -> None:
    """Raise :class:`SubscriberLagError` if entries after ``after`` may have been trimmed.

    ``after`` (0, 0) asks whether anything was ever trimmed. Otherwise ``after`` is the
    position of an entry this reader has seen: if the stream now starts beyond it, that
    entry was trimmed (``MAXLEN``), and so may have been its successors. This errs on the
    side of telling: a reader is never left to skip events silently. (``XINFO STREAM``'s
    ``max-deleted-entry-id`` does not help: trimming does not move it, only XDEL does.)
    """
    try:
        info: dict[Any, Any] = await redis.xinfo_stream(key)
    except rex.ResponseError:
        return  # no such stream (expired or destroyed): nothing was trimmed after us
    first = info.get("first-entry")
    if first is None:
        return
    if after == (0, 0):
        added, length = info.get("entries-added"), info.get("length")
        lost = added is not None and length is not None and int(added) > int(length)
    else:
        lost = parse_entry_id(first[0]) > after
    if lost:
        telemetry.count("lagged")
        raise SubscriberLagError(
            f"events after {format_position(after)} were trimmed (MAXLEN) before this "
            "reader could read them",
            key=key,
        )
