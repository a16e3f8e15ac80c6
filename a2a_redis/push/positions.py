"""Delivery from a log without versions: the legacy handler's, followed by stream position.

``RedisQueueManager`` (the legacy handler's) logs each event as the agent enqueues it, at
version 0: before its consumer saves it, so before anything the save could number. The
stream position of the entry is what identifies it instead: it is assigned once, by
``XADD``, and is the same for every replica and every retry. A job (``jobs.py``) that meets
an event without a version follows the log from the config's position cursor (``p:F`` in
``keys.push_state``) with this module:

* The notification id's version part, the dead letter's version, and ``push retry``'s
  selection use :func:`position_mark`, the position as one integer beyond every version.
* Versioned entries in the same log (a cancel recorded, or an orphan's FAILED, written by
  the versioned store) keep their version, and advance the version cursor as before.
* The job ends at a terminal event, or at a close mark of the queue when the stored task
  is terminal or gone (a state stored without an event), or when the task is terminal
  and nothing is left after the cursor.
"""

from __future__ import annotations

from typing import Any, Protocol

from a2a.types.a2a_pb2 import (
    Task,
    TaskArtifactUpdateEvent,
    TaskPushNotificationConfig,
    TaskStatusUpdateEvent,
)

from a2a_redis.errors import redis_errors
from a2a_redis.log.codec import F_STATE, TERMINAL_STATES
from a2a_redis.log.event_log import (
    Position,
    StreamEntry,
    check_not_trimmed,
    format_position,
    parse_entry_id,
    read_entries,
)
from a2a_redis.push.policy import notification_id


class _Outcome(Protocol):
    @property
    def refused(self) -> bool: ...


class Job(Protocol):
    """What this module needs of a ``jobs.Job`` (not imported: jobs.py imports this)."""

    sender: Any  # jobs._Sender
    task_id: str
    field: bytes
    job_id: bytes
    cursor_unmoved: bool

    async def deliver(
        self,
        config: TaskPushNotificationConfig,
        event: Any,
        version: int,
        resume: tuple[int, int, int] | None,
    ) -> _Outcome: ...
    async def advance(self, version: int, position: str) -> bool: ...


__all__ = ["follow_positions", "position_mark", "skip_positions"]

_PUSHED = (Task, TaskStatusUpdateEvent, TaskArtifactUpdateEvent)


def position_mark(position: Position) -> int:
    """A stream position as one integer beyond every version: ``ms * 2**64 + seq``."""
    return position[0] << 64 | position[1]


def _after(position: Position) -> Position:
    """The least stream position after ``position``."""
    return (position[0], position[1] + 1)


def _before(position: Position) -> Position:
    """The greatest stream position before ``position``."""
    ms, seq = position
    return (ms, seq - 1) if seq else (ms - 1, 2**64 - 1)


def _terminal(event: object) -> bool:
    status = getattr(event, "status", None)
    return status is not None and int(status.state) in TERMINAL_STATES


async def _ended(job: Job) -> bool:
    """Whether the stored task is terminal or gone (one round trip)."""
    key = job.sender.keys.task(job.task_id)
    with redis_errors("push delivery (task state)", key):
        state = await job.sender.redis.hget(key, F_STATE)
    return not isinstance(state, bytes) or (state.isdigit() and int(state) in TERMINAL_STATES)


async def _left_after(job: Job, position: Position) -> bool:
    """Whether the log holds an entry after ``position`` (one round trip)."""
    key = job.sender.keys.events(job.task_id)
    with redis_errors("push delivery (read the log)", key):
        rest, _ = await read_entries(job.sender.redis, key, position, count=1)
    return bool(rest)


async def follow_positions(
    job: Job,
    cursor: int,
    position: Position,
    state: int,
    retrying: tuple[int, int, int] | None,
) -> None:
    """Deliver the log's entries after ``position``, in order (see the module docstring).

    ``cursor`` is the highest version delivered; ``state`` the stored task's at adoption.
    """
    sender = job.sender
    redis, key = sender.redis, sender.keys.events(job.task_id)
    if state in TERMINAL_STATES and not await _left_after(job, position):
        return

    async def start() -> tuple[list[StreamEntry], Position]:
        # Entries trimmed after the cursor raise SubscriberLagError (``skip_positions``).
        await check_not_trimmed(redis, key, position if position == (0, 0) else _after(position))
        entries, _ = await read_entries(redis, key, position)
        return entries, position

    entries = sender.event_stream.listener.follow(job.task_id, start)
    try:
        async for entry in entries:
            if sender.closed:
                return
            event, version = entry.event, max(entry.version, 0)
            if entry.error is None and event is None:  # a close mark: the queue closed
                if await _ended(job):
                    return
                continue
            if 0 < version <= cursor or (entry.error is None and not isinstance(event, _PUSHED)):
                continue
            config = await sender.config_store.config_at(job.task_id, job.field)
            if config is None:
                return  # the config was deleted: nothing more to deliver to it
            job.cursor_unmoved = False
            if not await _settle(job, config, entry, version or position_mark(entry.position),
                                 retrying):  # fmt: skip
                return  # the URL is refused
            if not await job.advance(version, format_position(entry.position)):
                return
            cursor = max(cursor, version)
            if _terminal(event):
                return
    finally:
        await entries.aclose()


async def _settle(
    job: Job,
    config: TaskPushNotificationConfig,
    entry: StreamEntry,
    mark: int,
    retrying: tuple[int, int, int] | None,
) -> bool:
    """Deliver or dead-letter (undecodable) one entry; False if the URL is refused."""
    event = entry.event
    if isinstance(event, _PUSHED) and entry.error is None:
        resume = retrying if retrying and retrying[0] == mark else None
        return not (await job.deliver(config, event, mark, resume)).refused
    nid = notification_id(job.task_id, mark, job.field)
    reason = f"{type(entry.error).__name__}: the entry cannot be decoded"
    await job.sender.dead_letter(job.task_id, config, job.field, mark, nid, reason, 0)
    return True


async def skip_positions(
    job: Job,
    config: TaskPushNotificationConfig,
    raw: bytes,
    first: list[StreamEntry],
    *,
    lag: bool,
) -> None:
    """Move past what the log no longer has or cannot decode, after the position ``raw``.

    ``lag``: dead-letter the entries trimmed after ``raw``, resume at ``first`` (the log's
    first entry). Otherwise (an undecodable entry or config): with no position yet, follow
    by position from the start (``follow_positions`` dead-letters an undecodable entry
    itself); else dead-letter the entry after ``raw`` and move past it.
    """
    position = parse_entry_id(raw) if raw else (0, 0)
    if not lag and not raw:
        await job.advance(0, format_position(position))
        return
    if lag:
        mark, target = (
            position_mark(_after(position)),
            _before(first[0].position) if first else position,
        )
        reason = f"SubscriberLagError: entries after {format_position(position)} lost"
    else:
        key = job.sender.keys.events(job.task_id)
        with redis_errors("push delivery (read the log)", key):
            rest, _ = await read_entries(job.sender.redis, key, position, count=1)
        if not rest:
            return
        target = rest[0].position
        mark, reason = (
            position_mark(target),
            "CorruptDataError: the entry or config cannot be decoded",
        )
    nid = notification_id(job.task_id, mark, job.field)
    await job.sender.dead_letter(job.task_id, config, job.field, mark, nid, reason, 0)
    await job.advance(0, format_position(target))
