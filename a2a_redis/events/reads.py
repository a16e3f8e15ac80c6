"""``PipelinedReads``: the reads that subscribers' joins need, sent together.

When thousands of clients reconnect at once (a deploy, a load balancer restart), each
join needs a read or two: its task's stream tail, its backlog's first page. Sent one by
one, every concurrent read takes a pooled connection: the backend's pool runs dry, and
redis-py's default pool raises ``PoolExhaustedError`` at its 101st. Here the reads are
queued and sent as pipelines: every read queued while one pipeline is on the wire goes
out in the next one, and at most ``max_in_flight`` pipelines are on the wire at once. A
burst of joins then costs a few round trips on at most that many connections, whatever
its size. A lone read costs what it did: one round trip (it goes out at once).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis import exceptions as rex

from a2a_redis.connection.cluster import Client
from a2a_redis.errors import ListenerClosedError

__all__ = ["PipelinedReads"]

#: A read: a Redis command's arguments, as ``execute_command`` takes them.
Read = tuple[Any, ...]


class PipelinedReads:
    """Queues reads and sends them as pipelines, at most ``max_in_flight`` at once.

    Args:
        redis: The shared client; not owned.
        max_in_flight: Pipelines on the wire at once (so pooled connections used).
        max_commands: Commands per pipeline, at most.
    """

    def __init__(self, redis: Client, *, max_in_flight: int = 2, max_commands: int = 1024) -> None:
        self._redis = redis
        self._max_in_flight = max_in_flight
        self._max_commands = max_commands
        self._queue: list[tuple[tuple[Read, ...], asyncio.Future[list[Any]]]] = []
        self._senders: set[asyncio.Task[None]] = set()
        self._sending = 0  # senders running: counted in and out synchronously (see _send)
        self._closed = False

    async def read(self, *commands: Read) -> list[Any]:
        """The replies to ``commands``, sent in one pipeline (with other callers' reads).

        A command's error comes back as its reply (an exception instance); a lost
        connection raises (redis-py's error, one copy per caller).
        """
        if self._closed:
            raise ListenerClosedError("the listener is closed")
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((commands, future))
        if self._sending < self._max_in_flight:
            self._sending += 1
            sender = asyncio.ensure_future(self._send())
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return await future

    async def _send(self) -> None:
        """Send what is queued, a pipeline at a time, until the queue is empty.

        A sender counts itself out in the same step in which it finds the queue empty: a
        read queued after that starts a sender of its own (a task's done callback would
        run later, and a read queued meanwhile would wait for ever).
        """
        try:
            while self._queue and not self._closed:
                batch = self._take()
                if batch:
                    await self._send_batch(batch)
        finally:
            self._sending -= 1

    def _take(self) -> list[tuple[tuple[Read, ...], asyncio.Future[list[Any]]]]:
        """Up to ``max_commands`` commands of queued reads whose callers still wait."""
        taken, size = 0, 0
        for commands, _ in self._queue:
            if taken and size + len(commands) > self._max_commands:
                break
            taken += 1
            size += len(commands)
        batch, self._queue = self._queue[:taken], self._queue[taken:]
        return [(commands, future) for commands, future in batch if not future.done()]

    async def _send_batch(
        self, batch: list[tuple[tuple[Read, ...], asyncio.Future[list[Any]]]]
    ) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for commands, _ in batch:
                    for command in commands:
                        pipe.execute_command(*command)
                replies = await pipe.execute(raise_on_error=False)
        except (rex.RedisError, OSError) as e:
            for _, future in batch:
                if not future.done():
                    future.set_exception(_copy(e))
            return
        except BaseException:  # cancelled (closing): no caller may wait forever
            for _, future in batch:
                if not future.done():
                    future.set_exception(ListenerClosedError("the listener was closed"))
            raise
        at = 0
        for commands, future in batch:
            if not future.done():
                future.set_result(replies[at : at + len(commands)])
            at += len(commands)

    async def aclose(self) -> None:
        """Stop sending; every waiting caller gets ``ListenerClosedError``."""
        self._closed = True
        for sender in list(self._senders):
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
        queue, self._queue = self._queue, []
        for _, future in queue:
            if not future.done():
                future.set_exception(ListenerClosedError("the listener was closed"))


def _copy(error: BaseException) -> BaseException:
    """A fresh exception like ``error`` (each waiting caller raises its own)."""
    try:
        copy = type(error)(*error.args)
    except Exception:  # an exception class with an unusual constructor
        return error
    copy.__cause__ = error.__cause__
    return copy
