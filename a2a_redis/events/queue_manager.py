"""``RedisQueueManager``: the SDK's ``QueueManager`` across replicas, for ``LegacyRequestHandler``.

It stands on the same per-task Streams and the same listener as ``RedisTaskEventStream``.

* **The owning replica** (where ``create_or_tap``/``add`` opened the queue and the agent
  runs) keeps the SDK's in-process ``EventQueueLegacy``, so the local consumers behave
  exactly as with ``InMemoryQueueManager``. A child queue of ours is attached to it: every
  event enqueued is also appended, in order, to the task's stream (before ``enqueue_event``
  returns, so nothing can be dropped by a later ``close(immediate=True)``), and closing the
  queue appends a close mark. While the queue is open the replica holds a lease in Redis
  (``keys.lease``, see ``leases.py``), renewed every ``lease_ttl / 3`` together with a
  pub/sub heartbeat. An append is one round trip, shared with the appends of the other
  tasks enqueuing meanwhile (group commit, ``appends.py``).
* **Any replica's** ``tap(task_id)`` returns a queue fed from the stream with every event
  enqueued from then on, exactly once and in order, ending (closed, after it drained) at the
  close mark. If the owner dies, no heartbeat comes and the tap closes after ``lease_ttl``:
  taps never hang. ``tap`` returns None when no replica holds the task's lease. Its reads
  (the lease, the stream's end) are pipelined with other joins' reads, the stream's end
  read once per task for the taps and subscribers joining meanwhile (``backlog.py``,
  ``reads.py``): a wave of resubscribes uses a few connections, not one each. A tap that
  meets an entry it cannot decode closes there (logged at WARNING with the key and entry
  id), as on any other error: it never skips an event silently.
* ``get`` and ``close`` concern the queues this replica owns; ``TaskQueueExists`` and
  ``NoTaskQueue`` are raised where ``InMemoryQueueManager`` raises them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import cast

from a2a.server.events.event_queue import DEFAULT_MAX_QUEUE_SIZE, Event, EventQueueLegacy
from a2a.server.events.queue_manager import NoTaskQueue, QueueManager, TaskQueueExists

from a2a_redis import telemetry
from a2a_redis.connection.cluster import Client
from a2a_redis.connection.durability import Durability
from a2a_redis.errors import A2ARedisError, OwnerLostError, redis_errors
from a2a_redis.events.leases import LeaseKeeper
from a2a_redis.events.listener import StreamListener
from a2a_redis.events.plumbing import EventPlumbing, OnEventPlumbing
from a2a_redis.events.tokens import lease_ttl_of
from a2a_redis.log.codec import MAX_PAYLOAD_BYTES, close_mark_of
from a2a_redis.log.event_log import (
    Position,
    Rows,
    StreamEntry,
    StreamRetention,
    close_commands,
    format_position,
)
from a2a_redis.options import DEFAULT_LEASE_TTL, Options

__all__ = ["RedisQueueManager"]

logger = logging.getLogger(__name__)


class _StreamWriter(EventQueueLegacy):
    """A child of an owner queue that writes each event to the task's stream."""

    def __init__(self, manager: RedisQueueManager, task_id: str) -> None:
        super().__init__(max_queue_size=1)  # never holds anything itself
        self._manager = manager
        self._task_id = task_id
        # The consumer may close the queue (at the final event) while that event's append
        # is still in flight: the close mark must wait for it, or taps would end early.
        self._order = asyncio.Lock()

    async def enqueue_event(self, event: Event) -> None:
        async with self._order:
            if not self._is_closed:
                await self._manager._append(self._task_id, event)

    async def close(self, immediate: bool = False) -> None:
        async with self._order:
            if self._is_closed:
                return
            self._is_closed = True
            await self._manager._mark_closed(self._task_id)


class _RemoteTap(EventQueueLegacy):
    """A queue on a replica that does not own the task, fed from the task's stream."""

    pump: asyncio.Task[None] | None = None

    def offer(self, event: Event) -> bool:
        """Buffer ``event`` at once if that is all ``enqueue_event`` would do; else False.

        So while the consumer keeps up, an event costs its pump no task, timer or lock
        (``enqueue_event`` also feeds this tap's own taps, and waits while it is full).
        """
        if self._children or self._is_closed:
            return False
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            return False
        return True

    async def close(self, immediate: bool = False) -> None:
        """Close without waiting for the consumer to drain: it may be gone for good.

        The consumer still dequeues what is buffered, then gets ``QueueShutDown``.
        """
        async with self._lock:
            if self._is_closed and not immediate:
                return
            self._is_closed = True
        self.queue.shutdown(immediate)
        for child in self._children:
            await child.close(immediate)
        if immediate and self.pump is not None and self.pump is not asyncio.current_task():
            self.pump.cancel()


class RedisQueueManager(OnEventPlumbing, QueueManager):
    """Event queues that any replica can tap, on per-task Redis Streams.

    Args:
        redis: A ``redis.asyncio.Redis`` (``decode_responses=False``); not owned.
        prefix: Key namespace (default ``"a2a"``), as for the task store.
        listener: A shared :class:`StreamListener` (``RedisBackend`` shares one with the
            event stream); by default the manager makes its own and closes it in
            :meth:`aclose`.
        stream_retention: Cap and TTLs of the task streams.
        lease_ttl: Seconds a queue owner's lease lasts without renewal (default 10): after
            an owner dies, remote taps end within about this long.
        tap_max_queue_size: Bound of each remote tap's local buffer (the SDK's default).
        leases: A shared :class:`LeaseKeeper` (``RedisBackend`` shares one per process;
            its ``ttl`` then replaces ``lease_ttl``); by default the manager makes its own.
        durability: Replicas that must confirm each append (``WAIT``); None waits for none.
        max_payload_bytes: Largest encoded event appended to a task's stream (default
            8 MiB); ``enqueue_event`` of a larger one raises ``PayloadTooLargeError``.
    """

    def __init__(
        self,
        redis: Client,
        *,
        prefix: str = "a2a",
        listener: StreamListener | None = None,
        stream_retention: StreamRetention | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        tap_max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        leases: LeaseKeeper | None = None,
        durability: Durability | None = None,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        options = Options(
            prefix=prefix,
            stream_retention=stream_retention or StreamRetention(),
            lease_ttl=lease_ttl,
            durability=durability,
            max_payload_bytes=max_payload_bytes,
        )
        self._setup(redis, options, listener, leases, tap_max_queue_size)

    @classmethod
    def from_options(
        cls,
        redis: Client,
        options: Options,
        *,
        listener: StreamListener | None = None,
        leases: LeaseKeeper | None = None,
        tap_max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
    ) -> RedisQueueManager:
        """A queue manager over ``redis`` with the backend's shared ``options``."""
        manager = cls.__new__(cls)
        manager._setup(redis, options, listener, leases, tap_max_queue_size)
        return manager

    def _setup(
        self,
        redis: Client,
        options: Options,
        listener: StreamListener | None,
        leases: LeaseKeeper | None,
        tap_max_queue_size: int,
    ) -> None:
        self._log = EventPlumbing(redis, options, listener=listener, leases=leases)
        self._tap_size = tap_max_queue_size
        self._queues: dict[str, EventQueueLegacy] = {}  # queues this replica owns
        self._leases: dict[str, bytes] = {}  # owned queues still open -> their lease token
        self._taps: set[_RemoteTap] = set()
        telemetry.observe("a2a_redis.queue.taps", self, lambda manager: len(manager._taps))

    # -- QueueManager ----------------------------------------------------------------------
    async def add(self, task_id: str, queue: EventQueueLegacy) -> None:
        """Own ``queue`` for ``task_id``: take the lease and mirror its events to the stream."""
        if task_id in self._queues:
            raise TaskQueueExists
        if not isinstance(getattr(queue, "_children", None), list):
            raise TypeError("RedisQueueManager.add needs an EventQueueLegacy (or a subclass)")
        self._queues[task_id] = queue
        # EventQueueLegacy.tap() can only make a plain child, so ours joins its children,
        # first, so that local taps made meanwhile come after it.
        writer = _StreamWriter(self, task_id)
        queue._children.insert(0, writer)
        try:
            await self._take_lease(task_id)
        except BaseException:
            self._queues.pop(task_id, None)
            queue._children.remove(writer)
            raise

    async def get(self, task_id: str) -> EventQueueLegacy | None:
        """The queue this replica owns for ``task_id`` (remote queues are reached by tap)."""
        return self._queues.get(task_id)

    async def tap(self, task_id: str) -> EventQueueLegacy | None:
        """A queue receiving every later event of ``task_id``, wherever its queue is open."""
        local = self._queues.get(task_id)
        if local is not None:
            return await local.tap()
        lease = self._log.keys.lease(task_id)
        with redis_errors("tap", lease):  # pipelined with other joins' reads (reads.py)
            (token,) = await self.listener.reads.read(("GET", lease))
            if isinstance(token, Exception):
                raise token
        if token is None:
            return None
        return await self._remote_tap(task_id, cast(bytes, token))

    async def close(self, task_id: str) -> None:
        """Close this replica's queue for ``task_id``; remote taps end once drained."""
        queue = self._queues.pop(task_id, None)
        if queue is None:
            raise NoTaskQueue
        await queue.close()

    async def create_or_tap(self, task_id: str) -> EventQueueLegacy:
        """Tap this replica's queue for ``task_id``, or open (own) a new one."""
        local = self._queues.get(task_id)
        if local is not None:
            return await local.tap()
        queue = EventQueueLegacy()
        await self.add(task_id, queue)
        return queue

    async def end_taps(self, task_id: str) -> None:
        """Append a close mark naming no opening: every remote tap of the task ends.

        Each ends once drained: after a CANCELED or FAILED written for a task whose owner is
        gone. One round trip. The owner's own queue, if it still runs somewhere, is not touched.
        """
        retention = self._log.options.stream_retention
        commands = close_commands(self._log.keys, task_id, token=b"ended", retention=retention)
        await self._log.write("end the queue's taps", task_id, commands)

    # -- lifecycle -------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Owned queues, leases held, remote taps open."""
        return {"queues": len(self._queues), "leases": len(self._leases), "taps": len(self._taps)}

    async def aclose(self) -> None:
        """Release every lease (marking those queues closed) and end the remote taps."""
        try:
            for task_id in list(self._leases):
                with contextlib.suppress(A2ARedisError):
                    await self._mark_closed(task_id)
            for queue in list(self._queues.values()):
                with contextlib.suppress(A2ARedisError):
                    await queue.close(immediate=True)
            self._queues.clear()
            for tap in list(self._taps):
                await tap.close(immediate=True)
        finally:
            await self._log.aclose()

    # -- owner side ------------------------------------------------------------------------
    async def _take_lease(self, task_id: str) -> None:
        """Take the task's lease at once (``tap`` on any replica looks it up).

        The process's :class:`LeaseKeeper` renews it, with a heartbeat, until the queue
        closes. Its token names this opening of the queue and tells taps how long the
        owner's lease lasts.
        """
        self._leases[task_id] = await self.leases.take(task_id)

    async def _append(self, task_id: str, event: Event) -> None:
        await self._log.append("append to the queue", task_id, 0, event)

    async def _mark_closed(self, task_id: str) -> None:
        """Append the close mark (naming this opening's token) and release the lease; once."""
        token = self._leases.pop(task_id, None)
        if token is None:
            return
        self._log.forget(task_id)
        self.leases.drop(task_id, token)
        retention = self._log.options.stream_retention
        commands = close_commands(self._log.keys, task_id, token=token, retention=retention)
        await self._log.write("close the queue", task_id, commands)
        await self.leases.release(task_id, token)

    # -- tap side --------------------------------------------------------------------------
    async def _remote_tap(self, task_id: str, token: bytes) -> EventQueueLegacy:
        tap = _RemoteTap(max_queue_size=self._tap_size)
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def from_the_end() -> tuple[list[StreamEntry], Position]:
            """The stream's end, read once for every tap (or subscriber) joining meanwhile."""
            page = await self._log.backlogs.page(task_id, forward=False)
            if not started.done():
                started.set_result(None)
            if not page.entries:
                return [], (0, 0)
            last = page.entries[-1]
            mark = last.event is None and last.error is None
            if mark and await self._closes(page.key, last, token):
                return [last], (0, 0)  # closed since we read the lease: end
            return [], last.position  # (an older opening's close mark is history)

        lease = lease_ttl_of(token, self.leases.ttl)
        tap.pump = asyncio.ensure_future(self._pump(task_id, tap, from_the_end, lease))
        self._taps.add(tap)
        tap.pump.add_done_callback(lambda _: self._taps.discard(tap))
        done, _ = await asyncio.wait({started, tap.pump}, return_when=asyncio.FIRST_COMPLETED)
        if tap.pump in done and not started.done():
            tap.pump.result()  # the tap could not start: raise why
        return tap

    async def _closes(self, key: str, mark: StreamEntry, token: bytes) -> bool:
        """Whether the close mark ``mark`` is that of the queue opened with lease ``token``.

        The shared read decodes entries without the opening a close mark names: one read
        of that entry (pipelined with other joins' reads), only when a stream ends with one.
        """
        at = format_position(mark.position)
        (rows,) = await self.listener.reads.read(("XRANGE", key, at, at))
        if isinstance(rows, Exception):
            raise rows
        return any(close_mark_of(fields, token) for _, fields in cast(Rows, rows))

    async def _pump(
        self,
        task_id: str,
        tap: _RemoteTap,
        start: Callable[[], Awaitable[tuple[list[StreamEntry], Position]]],
        lease: float,
    ) -> None:
        """Feed ``tap`` until the close mark, or until the owner is silent too long.

        Too long: ``Options.owner_silence`` of its ``lease``. A consumer that leaves the
        tap full for ``lease`` is let go.
        """
        silence = self._log.options.owner_silence(lease)
        entries = self._log.listener.follow(task_id, start, idle_timeout=silence)
        try:
            async for entry in entries:
                if entry.error is not None:
                    raise entry.error
                if entry.event is None:
                    break
                if tap.offer(entry.event):
                    continue
                try:  # a consumer that stops reading for lease_ttl is gone: let go
                    await asyncio.wait_for(tap.enqueue_event(entry.event), lease)
                except asyncio.TimeoutError:
                    logger.warning("task %r: a remote tap stopped reading; closing it", task_id)
                    break
        except OwnerLostError:
            logger.warning("task %r: its queue owner went silent; closing the tap", task_id)
        except A2ARedisError as e:
            logger.warning("task %r: the remote tap failed: %s; closing it", task_id, e)
        finally:
            await entries.aclose()
            await tap.close()
