"""``EventPlumbing``: the Redis plumbing the event stream and the queue manager share.

Both stand on one mechanism: each task's event log (``log/event_log.py``), one live listener
and one lease keeper per process. This holds what they need of it, once: the namespace's
keys and options, the shared listener and lease keeper (or their own, made here and closed
by :meth:`EventPlumbing.aclose`), the joins' shared backlog reads (``backlog.py``), and the
one way both write to a task's log, with appends grouped across tasks
(:class:`GroupedAppends`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import Any

from a2a.server.events.event_queue import Event
from redis import exceptions as rex
from redis.asyncio.connection import AbstractConnection, ConnectionPool

from a2a_redis.connection.cluster import Client, is_cluster
from a2a_redis.connection.durability import Durability
from a2a_redis.connection.transaction import (
    BATCH_SCRIPT,
    Command,
    _exchange,
    batch_args,
    pack,
    run_atomically,
)
from a2a_redis.errors import ListenerClosedError, raise_if_pool_exhausted
from a2a_redis.events.backlog import Backlog
from a2a_redis.events.leases import LeaseKeeper
from a2a_redis.events.listener import StreamListener
from a2a_redis.log.codec import ends_task_stream
from a2a_redis.log.event_log import append_commands
from a2a_redis.log.keys import Keys
from a2a_redis.options import Options

__all__ = ["EventPlumbing", "GroupedAppends", "OnEventPlumbing"]

_BATCH_SHA = hashlib.sha1(BATCH_SCRIPT).hexdigest().encode()  # Redis names scripts by SHA-1
#: An append for a group: operation, stream key, commands, size, and the caller's future
#: (None for the caller that sends the group itself).
_Pending = tuple[str, str, list[Command], int, "asyncio.Future[None] | None"]


class EventPlumbing:
    """Keys, options, listener and leases of one namespace, and atomic log writes.

    Args:
        redis: The shared client; not owned.
        options: The namespace's options.
        listener: The process's shared listener; None makes one, closed by :meth:`aclose`.
        leases: The process's shared lease keeper; None makes one, closed by :meth:`aclose`.
    """

    def __init__(
        self,
        redis: Client,
        options: Options,
        *,
        listener: StreamListener | None = None,
        leases: LeaseKeeper | None = None,
    ) -> None:
        self.redis = redis
        self.options = options
        self.keys = Keys.for_client(redis, options.prefix)
        self._owns_listener = listener is None
        self.listener = StreamListener(redis, self.keys) if listener is None else listener
        self._owns_leases = leases is None
        self.leases = (
            LeaseKeeper(redis, self.keys, ttl=options.lease_ttl) if leases is None else leases
        )
        #: Joins' backlog reads, shared per task and pipelined across tasks.
        self.backlogs = Backlog(redis, self.listener, self.keys)
        #: Appends to tasks' logs, grouped across concurrently writing tasks.
        self.appends = GroupedAppends(redis)

    def append_commands(self, task_id: str, version: int, event: Event) -> list[Command]:
        """The commands appending ``event`` at ``version`` to the task's log, with its wake-up.

        Raises ``PayloadTooLargeError`` if the event is over ``max_payload_bytes``.
        """
        return append_commands(
            self.keys, task_id, version, event,
            terminal=ends_task_stream(event), retention=self.options.stream_retention,
            max_bytes=self.options.max_payload_bytes,
        )  # fmt: skip

    async def append(self, operation: str, task_id: str, version: int, event: Event) -> None:
        """Append ``event`` at ``version`` to the task's log, with its wake-up.

        Returns once the entry is in the stream; concurrent appends share round trips.
        """
        await self.write(operation, task_id, self.append_commands(task_id, version, event))

    async def write(self, operation: str, task_id: str, commands: list[Command]) -> None:
        """:meth:`run`, grouped with the writes of other tasks made meanwhile.

        One round trip, shared (:class:`GroupedAppends`); returns once ``commands`` ran.
        """
        key = self.keys.events(task_id)
        await self.appends.append(operation, key, commands, self.options.durability)

    async def run(self, operation: str, task_id: str, commands: list[Command]) -> None:
        """Run log commands for ``task_id`` atomically: one round trip (and ``WAIT``)."""
        await run_atomically(
            self.redis, operation, self.keys.events(task_id), commands, self.options.durability
        )

    async def aclose(self) -> None:
        """Close the listener and lease keeper made here (shared ones stay open)."""
        try:
            await self.appends.aclose()
            if self._owns_leases:
                await self.leases.aclose()
        finally:
            if self._owns_listener:
                await self.listener.aclose()


class GroupedAppends:
    """Log appends of concurrently writing tasks, sent together: group commit.

    An append made while no group is on the wire goes out at once, sent by its own caller.
    Appends made while one is on the wire wait, and go out together in the next group: one
    ``EVALSHA`` of ``transaction.BATCH_SCRIPT`` running every entry's XADD, PEXPIRE and
    PUBLISH in order, so N tasks enqueuing at once cost one round trip, not N. Each caller
    still returns only once its own entry is in the stream. Between groups the connection
    stays checked out while appends keep coming (a pool checkout costs about as much
    Python as the exchange itself), and goes back to the pool ``linger`` seconds after the
    last one.

    Errors: a group the server refuses as a whole (an error reply: the batch script checks
    its keys' types before it writes, and Redis refuses a script's writes for memory only
    at its first) or whose connection is lost is sent again one append at a time, through
    ``run_atomically``: each caller gets its own error or success, and the script cache
    and redis-py's retry policy apply as to any single write. On a Redis Cluster (a group
    would span slots) and with ``Durability`` (``WAIT``), each append is its own
    ``run_atomically``, as without grouping.

    Args:
        redis: The shared client; not owned.
        linger: Seconds without an append after which the connection goes back to the pool.
        max_group: Appends per group, at most.
        max_bytes: Bytes of arguments per group, about (a group holds at least one append).
    """

    def __init__(
        self,
        redis: Client,
        *,
        linger: float = 0.05,
        max_group: int = 256,
        max_bytes: int = 1 << 20,
    ) -> None:
        self._redis = redis
        #: The pool the held connection comes from; None on a cluster (no grouping there).
        self._pool: ConnectionPool | None = None if is_cluster(redis) else redis.connection_pool
        self._grouped = self._pool is not None
        self._linger = linger
        self._max_group = max_group
        self._max_bytes = max_bytes
        self._queue: list[_Pending] = []
        self._busy = False  # a group is being sent (by a caller, or by the sender task)
        self._sender: asyncio.Future[None] | None = None
        self._conn: AbstractConnection | None = None  # held between groups
        self._last = 0.0  # loop time of the last exchange
        self._timer: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Future[Any]] = set()
        self._closed = False

    async def append(
        self,
        operation: str,
        key: str,
        commands: list[Command],
        durability: Durability | None = None,
    ) -> None:
        """Run ``commands`` (one entry's, on stream ``key``) atomically, grouped with others'.

        Round trips: 1, shared with the appends made meanwhile (one more if the previous
        group is still on the wire).
        """
        if self._closed or not self._grouped or (durability is not None and durability.waits):
            await run_atomically(self._redis, operation, key, commands, durability)
            return
        if self._busy:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            size = sum(len(a) for c in commands for a in c if type(a) is bytes)
            self._queue.append((operation, key, commands, size, future))
            await future
            return
        self._busy = True
        try:
            await self._send([(operation, key, commands, 0, None)])
        finally:
            self._next()

    def _next(self) -> None:
        """The group in flight is done: let the sender task take what was queued meanwhile.

        Synchronous, like its check of the queue: an append queued later finds
        ``_busy`` False and sends itself.
        """
        if self._queue and not self._closed:
            self._sender = asyncio.ensure_future(self._drain())
        else:
            self._busy = False

    async def _drain(self) -> None:
        try:
            while self._queue and not self._closed:
                group, self._queue = self._take()
                await self._send(group)
        finally:
            self._busy = False

    def _take(self) -> tuple[list[_Pending], list[_Pending]]:
        """The next group from the queue (at least one), and what stays queued."""
        size = 0
        for n, pending in enumerate(self._queue):
            size += pending[3]
            if n and (n == self._max_group or size > self._max_bytes):
                return self._queue[:n], self._queue[n:]
        return self._queue, []

    async def _send(self, group: list[_Pending]) -> None:
        """Send one group and answer its callers (a caller's own append raises here).

        An append whose caller was cancelled while it waited is left out: nobody waits for it.
        """
        group = [p for p in group if p[4] is None or not p[4].done()]
        if not group:
            return
        keys, argv = batch_args([c for pending in group for c in pending[2]])
        packed = pack([(b"EVALSHA", _BATCH_SHA, len(keys), *keys, *argv)])
        try:
            reply = await self._exchange(packed)
        except (rex.ConnectionError, rex.TimeoutError):
            reply = None
        except BaseException:  # cancelled (closing): no caller may wait forever
            _answer(group, ListenerClosedError("the plumbing was closed"))
            raise
        if reply == 1:
            _answer(group, None)
        else:
            await self._one_by_one(group)

    async def _one_by_one(self, group: list[_Pending]) -> None:
        """Send a failed group's appends again, each alone, each caller its own answer."""
        for operation, key, commands, _, future in group:
            if future is None:
                await run_atomically(self._redis, operation, key, commands)
            elif not future.done():
                try:
                    await run_atomically(self._redis, operation, key, commands)
                except Exception as e:
                    future.set_exception(e)
                else:
                    future.set_result(None)

    async def _exchange(self, packed: bytes) -> Any:
        """One packed command's reply on the held connection (checked out if none is held)."""
        conn, pool = self._conn, self._pool
        assert pool is not None
        if conn is None:
            try:
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            except rex.ConnectionError as e:
                raise_if_pool_exhausted(e, "append to a task's log")
                raise
            self._conn = conn
        try:
            (reply,) = await _exchange(conn, packed, 1)
        except BaseException:
            self._conn = None
            try:
                await conn.disconnect()  # mid-reply: unusable
            finally:
                await pool.release(conn)
            raise
        if self._closed:  # (closed meanwhile: aclose left it to us)
            self._conn = None
            await pool.release(conn)
            return reply
        self._last = asyncio.get_running_loop().time()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(self._last + self._linger, self._idle)
        return reply

    def _idle(self) -> None:
        """Return the held connection once ``linger`` passed without an append."""
        self._timer = None
        conn, loop = self._conn, asyncio.get_running_loop()
        if conn is None:
            return
        if self._busy or loop.time() < self._last + self._linger:
            self._timer = loop.call_at(max(self._last, loop.time()) + self._linger, self._idle)
            return
        self._conn = None
        assert self._pool is not None
        released = asyncio.ensure_future(self._pool.release(conn))
        self._releasing.add(released)
        released.add_done_callback(self._releasing.discard)

    async def aclose(self) -> None:
        """Fail the queued appends and return the held connection."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue, self._queue = self._queue, []
        _answer(queue, ListenerClosedError("the plumbing was closed"))
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sender
        conn, self._conn = self._conn, None
        if conn is not None and self._pool is not None and not self._busy:
            await self._pool.release(conn)
        for released in list(self._releasing):
            with contextlib.suppress(Exception):
                await released


def _answer(group: list[_Pending], error: BaseException | None) -> None:
    """Wake the group's waiting callers: done, or ``error``."""
    for pending in group:
        future = pending[4]
        if future is not None and not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


class OnEventPlumbing:
    """The public view both components give of their plumbing (for health checks)."""

    _log: EventPlumbing

    @property
    def redis(self) -> Client:
        """The client this component uses (not owned)."""
        return self._log.redis

    @property
    def listener(self) -> StreamListener:
        """The process's listener."""
        return self._log.listener

    @property
    def leases(self) -> LeaseKeeper:
        """The process's lease keeper: the leases of the tasks this replica runs."""
        return self._log.leases
