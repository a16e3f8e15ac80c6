"""``TaskFeed``: the live entries of one task, in a small ring its local subscribers share.

A :class:`FeedReader` is one subscriber's place in it. Fan-out allocates nothing per
subscriber per entry but the wake-up itself: a reader takes entries straight from the
ring (by their sequence number, no list cut per reader), and one that has caught up waits
on a bare future the feed resolves at its next entry (no ``asyncio.Event.wait`` coroutine,
no queue). Ten thousand waiting readers then hold four small objects each between two
entries, which keeps the garbage collector's young generations, and so its pauses, small.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from a2a_redis import telemetry
from a2a_redis.connection.compat import within
from a2a_redis.errors import A2ARedisError, OwnerLostError
from a2a_redis.log.event_log import Position, StreamEntry

__all__ = ["SUBSCRIBER_BATCH", "FeedReader", "FeedSource", "TaskFeed", "wait_at_most"]

#: Entries a subscriber is handed at a time: all it can hold while it does not read.
SUBSCRIBER_BATCH = 64


async def wait_at_most(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds (without a new Task on 3.11+)."""
    with contextlib.suppress(TimeoutError):
        await within(event.wait(), timeout)


class TaskFeed:
    """The live entries of one task, shared by its local subscribers."""

    def __init__(self, task_id: str, key: str, channel: bytes, ring_size: int) -> None:
        self.task_id = task_id
        self.key = key
        self.channel = channel
        self.refs = 0
        self.ring: deque[StreamEntry] = deque(maxlen=ring_size)
        self.count = 0  # entries ever appended to the ring: the newest one's sequence number
        self.last: Position | None = None  # last entry read from Redis; None until ready
        self.covered_from: Position = (0, 0)  # the ring holds every entry after this
        self._loop = asyncio.get_running_loop()
        self.waiters: list[asyncio.Future[None]] = []  # readers waiting for the next change
        self.alive_at = self._loop.time()  # last entry or owner heartbeat
        self.ended: A2ARedisError | None = None
        self.destroyed = False
        self.dirty = False
        self.ready: asyncio.Future[None] | None = None
        #: Reads in flight that joining subscribers share (``event_stream``'s backlog).
        self.reads: dict[str, asyncio.Future[Any]] = {}
        #: One timer for all subscribers' owner-silence deadlines (the earliest asked).
        self.timer: asyncio.TimerHandle | None = None

    def extend(self, entries: list[StreamEntry], last: Position) -> None:
        """Append fetched entries (read up to ``last``) and wake the subscribers."""
        ring = self.ring
        for entry in entries:
            if len(ring) == ring.maxlen:
                self.covered_from = ring[0].position
            ring.append(entry)
        self.count += len(entries)
        self.last = last
        if entries:
            self.alive_at = self._loop.time()
            self.notify()

    def waiter(self) -> asyncio.Future[None]:
        """A future resolved at the feed's next change (entry, heartbeat, timer, end)."""
        future = self._loop.create_future()
        self.waiters.append(future)
        return future

    def notify(self) -> None:
        """Wake every subscriber waiting on this feed."""
        waiters = self.waiters
        if waiters:
            self.waiters = []
            for future in waiters:
                if not future.done():  # (a cancelled reader's)
                    future.set_result(None)

    def forget_cancelled(self) -> None:
        """Drop the futures of readers cancelled while waiting (as a reader leaves)."""
        if len(self.waiters) > self.refs:
            self.waiters = [f for f in self.waiters if not f.done()]

    def wake_at(self, when: float) -> None:
        """Wake the subscribers at loop time ``when``, or earlier.

        Subscribers that wait with a deadline share one timer, at the earliest deadline
        asked: no timer per subscriber per wait. One woken before its own deadline asks again.
        """
        timer = self.timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self.timer = self._loop.call_at(when, self._timer_fired)

    def _timer_fired(self) -> None:
        self.timer = None
        self.notify()

    def stop_timer(self) -> None:
        """Cancel the timer (the feed's last subscriber left)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class FeedSource(Protocol):
    """What a reader needs of the listener beside its feed."""

    def is_up(self, channel: bytes) -> bool:
        """Whether the pub/sub connection carrying ``channel`` is up."""

    async def catch_up(self, key: str, position: Position) -> tuple[list[StreamEntry], Position]:
        """Entries after ``position`` read from the stream, and the position read up to."""

    async def leave(self, feed: TaskFeed) -> None:
        """Unregister a subscriber of ``feed``."""


class FeedReader:
    """One subscriber's place in its task's feed: entries once each, in stream order.

    It starts with the entries its ``start`` read returned (``pending``, after
    ``position``), then takes the ring's, and reads from the stream itself
    (``FeedSource.catch_up``) when it has fallen behind the ring. Use::

        while (entry := reader.take()) is not None or not reader.finished:
            if entry is None:
                await reader.more()
            ...

    ``take`` is synchronous: the fan-out of one entry costs each reader one wake-up.
    """

    __slots__ = (
        "_behind",
        "_index",
        "_joined",
        "_pending",
        "_read_up_to",
        "_seen",
        "_source",
        "feed",
        "finished",
        "idle_timeout",
        "position",
    )

    def __init__(
        self,
        source: FeedSource,
        feed: TaskFeed,
        pending: list[StreamEntry],
        position: Position,
        joined: float,
        idle_timeout: float | Callable[[], float | None] | None,
    ) -> None:
        self._source = source
        self.feed = feed
        self._pending: list[StreamEntry] | None = pending[:SUBSCRIBER_BATCH] or None
        self._index = 0
        self.position = position  # of the last entry taken (or skipped as already seen)
        self._read_up_to = position  # the last position the pending read reached
        self._seen = -1  # sequence number of the last ring entry taken; -1: not placed yet
        self._behind = False  # the ring no longer holds what comes next: read the stream
        self._joined = joined
        self.idle_timeout = idle_timeout
        self.finished = False  # the stream was destroyed: no entry will come

    def take(self) -> StreamEntry | None:
        """The next entry if one is here; None: wait with :meth:`more`, unless ``finished``.

        Raises the feed's error once it ended (its pending entries delivered first).
        """
        pending = self._pending
        while pending is not None:
            i = self._index
            if i < len(pending):
                self._index = i + 1
                entry = pending[i]
                if entry.position > self.position:
                    self.position = entry.position
                    return entry
                continue
            self._pending = pending = None  # pin nothing while idle
            self.position = max(self.position, self._read_up_to)
            self._seen = -1
        feed = self.feed
        if feed.ended is not None:
            raise feed.ended
        if feed.destroyed:
            self.finished = True
            return None
        ring = feed.ring
        ahead = feed.count - self._seen
        if self._seen < 0 or ahead > len(ring):
            if self.position < feed.covered_from:  # fell behind the ring: read the stream
                self._behind = True
                return None
            ahead = 0  # place this reader: the ring's entries after its position
            for entry in reversed(ring):  # newest first: cost is the number of new entries
                if entry.position <= self.position:
                    break
                ahead += 1
            self._seen = feed.count - ahead
        if not ahead:
            return None
        self._seen += 1
        entry = ring[-ahead]
        self.position = entry.position
        return entry

    def more(self) -> Awaitable[None]:
        """What to await before :meth:`take` again: the feed's next change, or a catch-up.

        With ``idle_timeout`` (seconds, or a function giving them, None while no owner is
        expected), raises :class:`OwnerLostError` after that long without an entry or an
        owner heartbeat while the pub/sub connection is up (after a reconnect the owner
        gets a whole ``idle_timeout`` again).
        """
        if self._behind:
            return self._catch_up()
        feed = self.feed
        timeout = self.idle_timeout
        if callable(timeout):
            timeout = timeout()
        if timeout is not None:
            deadline = max(feed.alive_at, self._joined) + timeout
            if deadline > feed._loop.time():
                feed.wake_at(deadline)  # one timer per feed, not one per subscriber
            elif self._source.is_up(feed.channel):
                telemetry.count("owner_lost")
                raise OwnerLostError(
                    f"no event or heartbeat from the task's owner for {timeout}s", key=feed.key
                )
            # else our own connection is down: the owner's silence proves nothing
        return feed.waiter()

    async def _catch_up(self) -> None:
        self._behind = False
        pending, self._read_up_to = await self._source.catch_up(self.feed.key, self.position)
        self._pending = pending[:SUBSCRIBER_BATCH] or None
        self._index = 0
        self._seen = -1

    async def close(self) -> None:
        """Leave the feed (once)."""
        source, self._source = self._source, None  # type: ignore[assignment]
        self._pending = None
        if source is not None:
            try:
                await source.leave(self.feed)
            finally:
                self.feed.forget_cancelled()
