"""``TaskFeed``: the live entries of one task, in a small ring its local subscribers share."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

from a2a_redis.connection.compat import within
from a2a_redis.errors import A2ARedisError
from a2a_redis.log.event_log import Position, StreamEntry

__all__ = ["SUBSCRIBER_BATCH", "TaskFeed", "wait_at_most"]

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
        self.last: Position | None = None  # last entry read from Redis; None until ready
        self.covered_from: Position = (0, 0)  # the ring holds every entry after this
        self.changed = asyncio.Event()
        self.alive_at = asyncio.get_running_loop().time()  # last entry or owner heartbeat
        self.ended: A2ARedisError | None = None
        self.destroyed = False
        self.dirty = False
        self.ready: asyncio.Future[None] | None = None
        #: Reads in flight that joining subscribers share (``event_stream``'s backlog).
        self.reads: dict[str, asyncio.Future[Any]] = {}
        #: One timer for all subscribers' owner-silence deadlines (the earliest asked).
        self.timer: asyncio.TimerHandle | None = None

    def entries_after(
        self, position: Position, limit: int = SUBSCRIBER_BATCH
    ) -> list[StreamEntry] | None:
        """The first ``limit`` ring entries after ``position``.

        None if the ring no longer covers ``position``.
        """
        if position < self.covered_from:
            return None
        newer = []
        for entry in reversed(self.ring):  # newest first: cost is the number of new entries
            if entry.position <= position:
                break
            newer.append(entry)
        return newer[: -limit - 1 : -1]

    def extend(self, entries: list[StreamEntry], last: Position) -> None:
        """Append fetched entries (read up to ``last``) and wake the subscribers."""
        for entry in entries:
            if len(self.ring) == self.ring.maxlen:
                self.covered_from = self.ring[0].position
            self.ring.append(entry)
        self.last = last
        if entries:
            self.alive_at = asyncio.get_running_loop().time()
            self.notify()

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
        self.timer = asyncio.get_running_loop().call_at(when, self._timer_fired)

    def _timer_fired(self) -> None:
        self.timer = None
        self.notify()

    def stop_timer(self) -> None:
        """Cancel the timer (the feed's last subscriber left)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def notify(self) -> None:
        """Wake every subscriber waiting on this feed."""
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()
