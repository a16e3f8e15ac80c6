"""One delivery job: every event of one task, in order, to one push config.

A job (an entry of ``keys.push_jobs``, held by one consumer of the group) follows the task's
event log from the config's cursor (``c:F`` in ``keys.push_state``), through the event
stream's subscribe (backlog, then live events woken by pub/sub: no polling). For each event
the SDK would push (Task, status and artifact updates, with their version) it POSTs until
the event is delivered or dead-lettered, then advances the cursor; so event v+1 never goes
out before v is settled, and a job taken over after a crash resumes where the cursor says.
It ends when the task's terminal event is settled, the config is deleted, the task is
gone, or the task never appeared within ``max_age``.

Legacy handler: its queue manager logs events without a version (0), as the agent enqueues
them. At the first such event the job follows the log by stream position instead: the
cursor is the entry's position (``p:F``), and the notification id's version part is the
position as one integer beyond any version (:func:`position_mark`), as stable as the
entry. Versioned entries in the same log (a cancel or an orphan's FAILED, written by the
versioned store) keep their version. Such a job also ends at a close mark of the queue
when the stored task is terminal or gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from a2a.server.cluster.version import TaskVersion
from a2a.types.a2a_pb2 import (
    Task,
    TaskArtifactUpdateEvent,
    TaskPushNotificationConfig,
    TaskStatusUpdateEvent,
)
from a2a.utils.proto_utils import to_stream_response
from google.protobuf.json_format import MessageToDict

from a2a_redis.errors import A2ARedisError, CorruptDataError, SubscriberLagError, redis_errors
from a2a_redis.log.codec import TERMINAL_STATES, utf8, version_int
from a2a_redis.log.event_log import Position, StreamEntry, parse_entry_id, read_entries
from a2a_redis.push.policy import headers_for, notification_id, retry_after_seconds
from a2a_redis.push.positions import follow_positions, position_mark, skip_positions

if TYPE_CHECKING:
    from a2a_redis.connection.cluster import Client
    from a2a_redis.events.event_stream import RedisTaskEventStream
    from a2a_redis.log.keys import Keys
    from a2a_redis.push.policy import RetryPolicy
    from a2a_redis.stores.push_config_store import RedisPushNotificationConfigStore

__all__ = ["Job", "Outcome"]

logger = logging.getLogger(__name__)

PushEvent = Task | TaskStatusUpdateEvent | TaskArtifactUpdateEvent


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one notification ended: delivered (``error`` None), or dead with its last error."""

    attempts: int
    error: str | None = None
    refused: bool = False


class _Sender(Protocol):
    """What a job needs of ``RedisPushNotificationSender`` (``push/sender.py``)."""

    redis: Client
    keys: Keys
    retry: RetryPolicy
    scripts: dict[str, Any]
    event_stream: RedisTaskEventStream
    config_store: RedisPushNotificationConfigStore

    @property
    def closed(self) -> bool: ...
    async def acknowledge(self, job_id: bytes) -> None: ...
    async def is_pending(self, job_id: bytes) -> bool: ...
    async def url_allowed(self, url: str) -> bool: ...
    async def post(
        self, url: str, body: Any, headers: dict[str, str]
    ) -> tuple[int | None, str | None, str | None]: ...
    async def dead_letter(
        self,
        task_id: str,
        config: TaskPushNotificationConfig,
        field: bytes,
        version: int,
        nid: str,
        error: str,
        attempts: int,
    ) -> None: ...
    def count(self, what: str, n: int = 1) -> None: ...


def _state_of(event: PushEvent) -> int:
    if isinstance(event, TaskArtifactUpdateEvent):
        return 0
    return int(event.status.state)


class Job:
    """Delivers one task's events to one config; see the module docstring."""

    def __init__(self, sender: _Sender, job_id: bytes, task_id: str, field: bytes) -> None:
        self.sender = sender
        self.job_id = job_id
        self.task_id = task_id
        self.field = field
        keys = sender.keys
        self._state_keys = [keys.push_state(task_id), keys.task(task_id)]
        self._warned = False
        self.cursor_unmoved = True

    async def _script(self, name: str, args: list[Any]) -> Any:
        script = self.sender.scripts[name]
        with redis_errors(f"push delivery ({name})", self._state_keys[0]):
            return await script(keys=self._state_keys, args=args)

    async def run(self, replay: list[int] | None = None) -> None:
        """Deliver until the job ends, then acknowledge it (retrying Redis outages).

        With ``replay`` (versions; ``push retry``), deliver just those events, in order,
        outside the config's cursor.
        """
        sender, pause = self.sender, 0.0
        while not sender.closed:
            try:
                if pause:
                    await asyncio.sleep(pause)
                if replay is None:
                    await self._deliver_all()
                else:
                    await self._replay(replay)
                if sender.closed:
                    return  # closing is not finishing: the job stays pending for others
                await sender.acknowledge(self.job_id)
                return
            except (SubscriberLagError, CorruptDataError) as e:
                pause = 0.0
                await self._skip(e)
            except A2ARedisError as e:
                if sender.closed:
                    return
                pause = sender.retry.delay(4, None) + 0.05
                logger.warning(
                    "push job %s of task %r: %s; again in %.1f s",
                    self.job_id.decode(), self.task_id, e.reason, pause,
                )  # fmt: skip

    async def _adopt(self) -> list[Any] | None:
        job = self.job_id
        found = cast("list[Any]", await self._script("adopt", [self.field, job, b"0"]))
        if found[0] == -1:
            if await self.sender.is_pending(cast("bytes", found[1])):
                return None  # a live job delivers to this config
            found = cast("list[Any]", await self._script("adopt", [self.field, job, b"1"]))
        return found

    async def _deliver_all(self) -> None:
        found = await self._adopt()
        if found is None:
            logger.debug("push job %s: another job delivers to this config", self.job_id)
            return
        cursor, version, state, attempts = int(found[0]), int(found[1]), int(found[2]), found[3]
        position = parse_entry_id(found[4]) if len(found) > 4 and found[4] else None
        retrying = _parse_attempts(attempts)
        if version and cursor >= version and state in TERMINAL_STATES:
            await self._finish()
            return
        age_left = None
        if not version:  # the task does not exist (yet): wait for it at most max_age
            created_ms = int(self.job_id.split(b"-")[0])
            age_left = max(
                0.0, self.sender.retry.max_age - (time.time() * 1000 - created_ms) / 1000
            )
        follow = asyncio.ensure_future(self._follow_any(cursor, position, state, retrying))
        try:
            done, _ = await asyncio.wait({follow}, timeout=age_left)
            if follow not in done and self.cursor_unmoved:
                await _stop(follow)
                logger.info("push job %s: task %r never appeared", self.job_id, self.task_id)
            else:
                await follow
        finally:
            await _stop(follow)
        if not self.sender.closed:
            await self._finish()

    async def _follow_any(
        self,
        cursor: int,
        position: Position | None,
        state: int,
        retrying: tuple[int, int, int] | None,
    ) -> None:
        if position is None:
            if not await self._follow(cursor, retrying):
                return
            position = (0, 0)  # the legacy queue manager's log: follow it by position
        await follow_positions(self, cursor, position, state, retrying)

    async def _follow(self, cursor: int, retrying: tuple[int, int, int] | None) -> bool:
        """Deliver by version; True (nothing delivered) at an event without a version."""
        stream = self.sender.event_stream
        events = stream.subscribe(self.task_id, after=TaskVersion(cursor))
        try:
            async for item in events:
                if self.sender.closed:
                    return False
                event, version = item.event, version_int(item.version)
                if isinstance(event, PushEvent) and not version:
                    return True
                if not isinstance(event, PushEvent) or version <= cursor:
                    continue
                self.cursor_unmoved = False
                config = await self.sender.config_store.config_at(self.task_id, self.field)
                if config is None:
                    return False  # the config was deleted: nothing more to deliver to it
                resume = retrying if retrying and retrying[0] == version else None
                outcome = await self.deliver(config, event, version, resume)
                if outcome.refused:
                    return False
                moved = await self._script("advance", [self.field, self.job_id, version])
                if not moved:
                    logger.info("push job %s: another job took this config over", self.job_id)
                    return False
                cursor = version
                if _state_of(event) in TERMINAL_STATES:
                    return False
        finally:
            await events.aclose()
        return False

    async def advance(self, version: int, position: str) -> bool:
        """Move the cursors past an entry settled; False if another job took the config."""
        if await self._script("advance", [self.field, self.job_id, version, position]):
            return True
        logger.info("push job %s: another job took this config over", self.job_id)
        return False

    async def _skip(self, error: A2ARedisError) -> None:
        """Dead-letter events the log no longer has (trimmed) or cannot decode; move on."""
        found = await self._adopt()
        config = await self.sender.config_store.config_at(self.task_id, self.field)
        if found is None or config is None:
            return
        cursor, raw = int(found[0]), found[4] if len(found) > 4 else b""
        target = cursor + 1
        first: list[StreamEntry] = []
        if isinstance(error, SubscriberLagError) or not (cursor or raw):
            key = self.sender.keys.events(self.task_id)
            with redis_errors("push delivery (first entry)", key):
                first, _ = await read_entries(self.sender.redis, key, (0, 0), count=1)
        if raw or (first and first[0].version <= 0):  # a log without versions (or unreadable)
            await skip_positions(
                self, config, raw, first, lag=isinstance(error, SubscriberLagError)
            )
            return
        if isinstance(error, SubscriberLagError) and first and first[0].version > cursor + 1:
            target = first[0].version - 1
        nid = notification_id(self.task_id, cursor + 1, self.field)
        reason = f"{type(error).__name__}: versions {cursor + 1}-{target} lost"
        await self.sender.dead_letter(self.task_id, config, self.field, cursor + 1, nid, reason, 0)
        await self._script("advance", [self.field, self.job_id, target])

    async def _replay(self, versions: list[int]) -> None:
        config = await self.sender.config_store.config_at(self.task_id, self.field)
        if config is None:
            return
        key, wanted = self.sender.keys.events(self.task_id), set(versions)
        found: dict[int, PushEvent] = {}
        position = (0, 0)
        while wanted - found.keys():
            with redis_errors("push retry (read the log)", key):
                entries, last = await read_entries(self.sender.redis, key, position)
            if last == position:
                break
            position = last
            for entry in entries:
                mark = entry.version if entry.version > 0 else position_mark(entry.position)
                if mark in wanted and isinstance(entry.event, PushEvent):
                    found[mark] = entry.event
        for version in sorted(wanted):
            event = found.get(version)
            if event is None:
                nid = notification_id(self.task_id, version, self.field)
                reason = "the event is no longer in the task's log"
                await self.sender.dead_letter(
                    self.task_id, config, self.field, version, nid, reason, 0
                )
            else:
                await self.deliver(config, event, version, None)

    async def _finish(self) -> None:
        await self._script("finish", [self.field, self.job_id])

    async def deliver(
        self,
        config: TaskPushNotificationConfig,
        event: PushEvent,
        version: int,
        resume: tuple[int, int, int] | None,
    ) -> Outcome:
        """POST one event until delivered, refused or dead-lettered (attempts persisted)."""
        sender, policy = self.sender, self.sender.retry
        nid = notification_id(self.task_id, version, self.field)
        attempts, first_ms = (resume[1], resume[2]) if resume else (0, int(time.time() * 1000))
        if not await sender.url_allowed(config.url):
            if not self._warned:
                self._warned = True
                logger.warning(
                    "push config %r of task %r: URL refused by the URL policy; nothing sent",
                    config.id, self.task_id,
                )  # fmt: skip
            sender.count("refused")
            return Outcome(attempts, "refused URL", refused=True)
        body = MessageToDict(to_stream_response(event))
        headers = headers_for(config, nid)
        while True:
            attempts += 1
            status, error, retry_after = await sender.post(config.url, body, headers)
            if error is None:
                sender.count("delivered")
                logger.debug("push %s of task %r delivered (%d)", nid, self.task_id, attempts)
                return Outcome(attempts)
            delay = policy.delay(attempts, retry_after_seconds(retry_after))
            age = time.time() - first_ms / 1000 + delay
            if (
                not policy.retryable(status)
                or attempts >= policy.max_attempts
                or age > policy.max_age
            ):
                await sender.dead_letter(
                    self.task_id, config, self.field, version, nid, error, attempts
                )
                return Outcome(attempts, error)
            sender.count("retried")
            with redis_errors("push delivery (attempts)", self._state_keys[0]):
                await sender.redis.hset(
                    self._state_keys[0], b"a:" + self.field,
                    b"%d:%d:%d" % (version, attempts, first_ms),
                )  # fmt: skip
            await asyncio.sleep(delay)


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` until it has ended, then return (re-raising a cancel of our own).

    Once is not always enough: on Python 3.11 a cancel that lands as an ``asyncio.timeout``
    inside the event feed expires can be swallowed, and the follower would wait on.
    """
    interrupted = False
    while not task.done():
        task.cancel()
        try:
            await asyncio.wait({task}, timeout=0.5)
        except asyncio.CancelledError:
            interrupted = True
    if not task.cancelled() and task.exception() is not None:
        logger.debug("push job follower ended with %r", task.exception())
    if interrupted:
        raise asyncio.CancelledError


def _parse_attempts(raw: Any) -> tuple[int, int, int] | None:
    """``"version:attempts:first ms"`` (``a:F``) as integers; None if absent or malformed."""
    parts = (raw if isinstance(raw, bytes) else utf8(str(raw))).split(b":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])
