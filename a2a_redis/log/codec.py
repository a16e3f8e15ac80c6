"""How a2a-redis lays bytes out in Redis: task records, index members, stream entries.

A2A objects are stored as their protobuf wire bytes. Our own small envelopes use msgpack.
Every record carries a schema version (:data:`SCHEMA_VERSION`) so that a later release can
migrate it; a record from an unknown (newer) schema raises :class:`UnsupportedSchemaError`.
Every decoding failure raises :class:`CorruptDataError` naming the key.

Task record (a hash, ``keys.task``)::

    f  schema version          "1"
    o  owner                   UTF-8 (surrogates passed through)
    v  version                 decimal integer, 1 on the first write, +1 per write
    d  the Task                protobuf bytes
    c  context id              UTF-8
    s  state                   decimal TaskState number
    m  ListTasks index member  see :func:`index_member`
    w  write id                8 random bytes naming the write that produced this record
    x  expires at              Unix ms when a terminal-task TTL applies, else "0"

Stream entry (``keys.events``)::

    f  schema version   "1"
    v  task version     decimal integer (the version the event produced)
    e  the event        ``StreamResponse`` protobuf bytes (as the SDK's SQL stream stores)
    t  (optional)       writer's clock in µs, then ``;`` and a W3C traceparent inside a
                        span (``telemetry.entry_context``); older entries have none
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped,unused-ignore]
from a2a.server.cluster.version import TaskVersion
from a2a.server.events.event_queue import Event
from a2a.types.a2a_pb2 import Message, StreamResponse, Task, TaskState
from a2a.utils.proto_utils import to_stream_response
from a2a.utils.task import ListTasksCursor
from google.protobuf.message import DecodeError

from a2a_redis import telemetry
from a2a_redis.errors import CorruptDataError, PayloadTooLargeError, UnsupportedSchemaError

__all__ = [
    "CLOSED",
    "HEAD_FIELDS",
    "MAX_PAYLOAD_BYTES",
    "SCHEMA_VERSION",
    "TERMINAL_STATES",
    "RecordHead",
    "check_payload_size",
    "check_schema",
    "close_mark_of",
    "decode_event",
    "decode_head",
    "decode_locator",
    "decode_stored",
    "decode_task",
    "decode_text",
    "encode_closed",
    "encode_event",
    "encode_locator",
    "encode_record",
    "ends_task_stream",
    "entry_version_hint",
    "index_member",
    "member_cursor",
    "member_for_cursor",
    "member_task_id",
    "member_timestamp_floor",
    "utf8",
    "version_int",
]

SCHEMA_VERSION = 1
_SCHEMA = b"1"

#: Default cap (``max_payload_bytes``) on one encoded payload: a Task record's protobuf,
#: one stream entry's event, one push config. Redis would take 512 MB, but every save
#: rewrites the whole Task, a ListTasks page reads up to its page size of them in one
#: reply, and every event is also published whole to each replica's pub/sub connection,
#: which Redis drops past ``client-output-buffer-limit pubsub`` (32 MB, or 8 MB for 60 s,
#: by default). 8 MiB leaves room for inline files while keeping a burst of events under
#: that limit and one call's transfer bounded; large files belong behind a URI.
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024

TERMINAL_STATES = frozenset(
    {
        TaskState.TASK_STATE_COMPLETED,
        TaskState.TASK_STATE_CANCELED,
        TaskState.TASK_STATE_FAILED,
        TaskState.TASK_STATE_REJECTED,
    }
)

F_SCHEMA, F_OWNER, F_VERSION, F_TASK = b"f", b"o", b"v", b"d"
F_CONTEXT, F_STATE, F_MEMBER, F_WRITE, F_EXPIRES = b"c", b"s", b"m", b"w", b"x"

E_EVENT, E_KIND, E_OPENING = b"e", b"k", b"o"  # stream entries (with F_SCHEMA, F_VERSION)
E_CONTEXT = b"t"  # optional: the writer's clock (µs) and W3C traceparent (telemetry.py)

#: The fields a write reads before deciding (everything but the payload).
HEAD_FIELDS = (F_SCHEMA, F_OWNER, F_VERSION, F_CONTEXT, F_STATE, F_MEMBER, F_WRITE, F_EXPIRES)

_TS_OFFSET = 1 << 127  # timestamps in ns can be negative or exceed int64: 128-bit, offset
_NO_TS = b"\x00" + bytes(16)
_MEMBER_HEAD = 17


def decode_text(key: str, field: str, raw: bytes) -> str:
    """Stored UTF-8 (lone surrogates passed through) as text; CorruptDataError if invalid."""
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise CorruptDataError(f"field {field!r} is not valid UTF-8", key=key) from None


def utf8(text: str) -> bytes:
    """``text`` as UTF-8, lone surrogates passed through: how every id and owner is stored."""
    return text.encode("utf-8", "surrogatepass")


def check_schema(key: str, schema: bytes | int | None, what: str = "record") -> None:
    """Accept :data:`SCHEMA_VERSION` (as a hash field's digits or a msgpack integer).

    A newer version raises :class:`UnsupportedSchemaError`, anything else
    :class:`CorruptDataError`, both naming ``key`` (never showing the bytes found).
    """
    if schema == _SCHEMA or (type(schema) is int and schema == SCHEMA_VERSION):
        return
    if isinstance(schema, bytes) and schema.isdigit() and len(schema) < 10:
        schema = int(schema)
    if type(schema) is int and schema > SCHEMA_VERSION:
        raise UnsupportedSchemaError(
            f"{what} has schema version {schema}, this release reads "
            f"{SCHEMA_VERSION}: upgrade a2a-redis",
            key=key,
        )
    raise CorruptDataError(f"{what} has no valid schema version", key=key)


def check_payload_size(key: str, what: str, size: int, limit: int) -> None:
    """Raise :class:`PayloadTooLargeError` naming ``key`` if ``size`` is over ``limit``."""
    if size > limit:
        telemetry.payload_rejected("too_large")
        raise PayloadTooLargeError(
            f"{what} is {size} bytes encoded, over the {limit}-byte limit (max_payload_bytes)",
            key=key,
            size=size,
            limit=limit,
        )


def _int(key: str, field: str, raw: bytes | None) -> int:
    try:
        return int(raw) if raw is not None else 0  # (over 4,300 digits: ValueError too)
    except ValueError:
        raise CorruptDataError(f"field {field!r} is not an integer", key=key) from None


def _state(key: str, raw: bytes | None) -> int:
    """The record's state field: strictly a decimal int32, as written (``b"%d"``).

    Anything else (missing, blank, padded, ``+3``, ``0_3``, which ``int()`` would accept) is
    :class:`CorruptDataError`: writers decide on this field (a terminal state is final), so
    a damaged one must never pass for a state, terminal or not.
    """
    digits = raw[1:] if raw is not None and raw[:1] == b"-" else raw
    if raw is None or digits is None or not digits.isdigit() or len(digits) > 10:
        raise CorruptDataError("record has no valid state", key=key)
    state = int(raw)
    if not -(2**31) <= state < 2**31:
        raise CorruptDataError("record has no valid state", key=key)
    return state


def ends_task_stream(event: Event) -> bool:
    """Whether ``event`` ends a task's activity (terminal state, or a Message reply)."""
    if isinstance(event, Message):
        return True
    return event.status.state in TERMINAL_STATES if hasattr(event, "status") else False


def version_int(version: TaskVersion) -> int:
    """The integer inside a ``TaskVersion`` (0 for MISSING); TypeError for other kinds.

    ``TaskVersion`` exposes no accessor; the SDK's own SQL store reads ``_value`` likewise.
    """
    value = version._value
    if not isinstance(value, int):
        raise TypeError(f"a2a-redis needs integer task versions, got {type(value).__name__}")
    return value


# -- task records --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RecordHead:
    """What a write must know of the stored record to decide and to keep indexes right."""

    owner: str
    version: int
    context_id: str
    state: int
    member: bytes
    write_id: bytes
    expires_at: int

    def locator(self) -> bytes:
        """This record's entry in the owner's ``expiring`` zset."""
        return encode_locator(self.context_id, self.state, self.member)


def decode_head(key: str, values: list[bytes | None]) -> RecordHead | None:
    """Decode an HMGET of :data:`HEAD_FIELDS`; None when the record does not exist."""
    if all(v is None for v in values):
        return None
    schema, owner, version, context_id, state, member, write_id, expires = values
    check_schema(key, schema)
    if owner is None or version is None or member is None:
        raise CorruptDataError("record is missing its owner, version or index member", key=key)
    return RecordHead(
        owner=decode_text(key, "o", owner),
        version=_int(key, "v", version),
        context_id=decode_text(key, "c", context_id or b""),
        state=_state(key, state),
        member=member,
        write_id=write_id or b"",
        expires_at=_int(key, "x", expires),
    )


def encode_record(
    task: Task,
    payload: bytes,
    *,
    owner: str,
    version: int,
    write_id: bytes,
    expires_at: int,
    member: bytes | None = None,
) -> dict[bytes, bytes]:
    """The hash fields of a task record (``payload`` is ``task.SerializeToString()``).

    ``member`` is the task's :func:`index_member`, if the caller has it already.
    """
    return {
        F_SCHEMA: _SCHEMA,
        F_OWNER: utf8(owner),
        F_VERSION: b"%d" % version,
        F_TASK: payload,
        F_CONTEXT: utf8(task.context_id),
        F_STATE: b"%d" % task.status.state,
        F_MEMBER: index_member(task) if member is None else member,
        F_WRITE: write_id,
        F_EXPIRES: b"%d" % expires_at,
    }


def decode_stored(
    key: str, task_id: str, values: list[bytes | None]
) -> tuple[str, Task, int] | None:
    """Decode the HMGET of ``F_SCHEMA, F_OWNER, F_VERSION, F_TASK``: (owner, task, version).

    None when the record is absent. The whole record is checked (schema first, then owner,
    payload and version) before anyone compares owners, so a corrupt record raises
    :class:`CorruptDataError` naming ``key`` to every caller and never passes for another
    owner's task; the caller still shows a task only to its owner.
    """
    schema, owner, version, payload = values
    if schema is None and owner is None and version is None and payload is None:
        return None
    task = decode_task(key, task_id, schema, payload)
    if owner is None:
        raise CorruptDataError("record has no owner", key=key)
    if version is None or not version.isdigit() or len(version) > 18:
        raise CorruptDataError("record has no valid version", key=key)
    return decode_text(key, "o", owner), task, int(version)


def decode_task(key: str, task_id: str, schema: bytes | None, payload: bytes | None) -> Task:
    """Decode a stored Task, checking the schema and that it is the task asked for."""
    check_schema(key, schema)
    if payload is None:
        raise CorruptDataError("record has no task payload", key=key)
    try:
        task: Task = Task.FromString(payload)
    except (DecodeError, RuntimeWarning) as e:
        raise CorruptDataError(f"task payload is not a valid Task: {e}", key=key) from e
    if task.id != task_id:
        raise CorruptDataError("task payload names a different task id", key=key)
    return task


# -- ListTasks index -------------------------------------------------------------------------
def _member(has_ts: bool, ts_ns: int, task_id: str) -> bytes:
    # Clamping keeps the order against every real task (Timestamp stays within +-2.6e20 ns),
    # so a crafted page cursor beyond the 128-bit range still names a valid position, and
    # "surrogatepass" keeps code point order for the lone surrogates a cursor can carry.
    ts = min(max(ts_ns + _TS_OFFSET, 0), (1 << 128) - 1)
    head = b"\x01" + ts.to_bytes(16, "big") if has_ts else _NO_TS
    return head + utf8(task_id)


def index_member(task: Task) -> bytes:
    """The task's member in the ListTasks indexes.

    All members have score 0 and sort by bytes, which equals the SDK's sort key
    ``(has timestamp, timestamp_ns, id)``: a flag byte, the timestamp as a 128-bit
    big-endian offset integer, then the id in UTF-8 (whose byte order is code point order).
    """
    has_ts = task.HasField("status") and task.status.HasField("timestamp")
    return _member(has_ts, task.status.timestamp.ToNanoseconds() if has_ts else 0, task.id)


def member_for_cursor(cursor: ListTasksCursor) -> bytes:
    """The index member at a ListTasks cursor position."""
    has_ts = cursor.timestamp_ns is not None
    return _member(has_ts, cursor.timestamp_ns or 0, cursor.task_id)


def member_timestamp_floor(ts_ns: int) -> bytes:
    """The smallest member with this timestamp (for ``status_timestamp_after``)."""
    return _member(True, ts_ns, "")


def member_task_id(key: str, member: bytes) -> str:
    """The task id inside an index member."""
    if len(member) < _MEMBER_HEAD:
        raise CorruptDataError("index member is too short", key=key)
    try:
        return member[_MEMBER_HEAD:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptDataError("index member holds an invalid task id", key=key) from e


def member_cursor(key: str, member: bytes) -> ListTasksCursor:
    """The ListTasks cursor pointing at an index member."""
    task_id = member_task_id(key, member)
    if member[0] == 0:
        return ListTasksCursor(timestamp_ns=None, task_id=task_id)
    return ListTasksCursor(
        timestamp_ns=int.from_bytes(member[1:_MEMBER_HEAD], "big") - _TS_OFFSET, task_id=task_id
    )


def encode_locator(context_id: str, state: int, member: bytes) -> bytes:
    """A msgpack envelope naming every index entry of one task (schema-versioned)."""
    packed: bytes = msgpack.packb([SCHEMA_VERSION, utf8(context_id), state, member])
    return packed


def decode_locator(key: str, raw: bytes) -> tuple[str, int, bytes]:
    """Decode :func:`encode_locator`'s envelope into ``(context_id, state, member)``."""
    try:
        schema, context_id, state, member = msgpack.unpackb(raw)
        if schema != SCHEMA_VERSION:
            raise ValueError(f"schema {schema!r}")
        return decode_text(key, "locator", context_id), int(state), bytes(member)
    except (ValueError, TypeError, AttributeError, msgpack.UnpackException) as e:
        raise CorruptDataError(f"invalid expiry locator: {e}", key=key) from e


# -- stream entries --------------------------------------------------------------------------
def encode_event(
    version: int, event: Event, *, key: str = "", limit: int = MAX_PAYLOAD_BYTES
) -> dict[bytes, bytes]:
    """The fields of a stream entry carrying ``event`` at task ``version``.

    Raises :class:`PayloadTooLargeError` (naming ``key``, the stream) if the encoded event
    is over ``limit`` bytes.
    """
    payload = to_stream_response(event).SerializeToString()
    check_payload_size(key, "event", len(payload), limit)
    fields = {F_SCHEMA: _SCHEMA, F_VERSION: b"%d" % version, E_EVENT: payload}
    context = telemetry.entry_context()
    if context is not None:
        fields[E_CONTEXT] = context
    return fields


#: Marks, in a task's stream, where an event queue was closed (``RedisQueueManager``).
CLOSED = b"closed"


def encode_closed(token: bytes) -> dict[bytes, bytes]:
    """The fields of the entry marking the close of the queue opened with lease ``token``."""
    return {F_SCHEMA: _SCHEMA, F_VERSION: b"0", E_KIND: CLOSED, E_OPENING: token}


def close_mark_of(fields: dict[bytes, bytes], token: bytes) -> bool:
    """Whether an entry is the close mark of the queue opened with lease ``token``."""
    return fields.get(E_KIND) == CLOSED and fields.get(E_OPENING) == token


def entry_version_hint(fields: dict[bytes, bytes]) -> int:
    """The version an undecodable entry names, if it is of our schema; -1 if unknown."""
    raw = fields.get(F_VERSION)
    if fields.get(F_SCHEMA) != _SCHEMA or raw is None or not raw.isdigit() or len(raw) > 18:
        return -1
    return int(raw)


def decode_event(key: str, fields: dict[bytes, bytes]) -> tuple[int, Event | None]:
    """Decode a stream entry into ``(version, event)``; the event is None for a close mark."""
    check_schema(key, fields.get(F_SCHEMA))
    version = _int(key, "v", fields.get(F_VERSION))
    if fields.get(E_KIND) == CLOSED:
        return version, None
    payload = fields.get(E_EVENT)
    if payload is None:
        raise CorruptDataError("stream entry has no event", key=key)
    try:
        response = StreamResponse.FromString(payload)
    except DecodeError as e:
        raise CorruptDataError(f"stream entry is not a valid StreamResponse: {e}", key=key) from e
    which = response.WhichOneof("payload")
    event: Any = getattr(response, which) if which else None
    if event is None:
        raise CorruptDataError("stream entry carries no known event", key=key)
    return version, event
