"""Writes to tasks' logs, grouped across tasks (group commit) and packed once per task.

:class:`GroupedAppends` sends the writes of concurrently writing tasks together: one
``EVALSHA`` of ``transaction.BATCH_SCRIPT`` per round trip, whatever the number of tasks,
each writer returning only once its own write ran. :class:`EntryPacker` packs an event's
append (``event_log.append_commands``: the entry's capped XADD, the stream's PEXPIRE and
the wake-up's PUBLISH) straight into the script's arguments, the parts that do not change
from one append to the next packed once per task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from a2a.server.events.event_queue import Event
from redis import exceptions as rex
from redis.asyncio.connection import AbstractConnection, ConnectionPool

from a2a_redis.connection.cluster import Client, is_cluster
from a2a_redis.connection.durability import Durability
from a2a_redis.connection.transaction import (
    WITH_ENTRY_ID,
    Batch,
    Command,
    _exchange,
    batch_args,
    bulk,
    run_atomically,
)
from a2a_redis.errors import ListenerClosedError, raise_if_pool_exhausted
from a2a_redis.log.codec import MAX_PAYLOAD_BYTES, encode_event, ends_task_stream
from a2a_redis.log.event_log import StreamRetention, append_commands, pack_fields
from a2a_redis.log.keys import Keys

__all__ = ["EntryPacker", "GroupedAppends", "Write"]

#: A command's part of the batch script's ARGV: element count, packed elements, keys.
Part = tuple[int, bytes, tuple[bytes, ...]]


class Write:
    """One atomic write to a task's log: its packed parts, and its commands (sent alone)."""

    __slots__ = ("commands", "future", "key", "operation", "parts", "size")

    def __init__(
        self, operation: str, key: str, parts: list[Part], commands: Callable[[], list[Command]]
    ) -> None:
        self.operation = operation
        self.key = key  # the stream's (named in errors)
        self.parts = parts
        self.commands = commands
        self.size = sum(len(part[1]) for part in parts)
        self.future: asyncio.Future[None] | None = None  # None: its caller sends it

    @classmethod
    def of(cls, operation: str, key: str, commands: list[Command]) -> Write:
        """A write of any log commands (a close mark, an end of taps), packed as they are."""
        keys, argv = batch_args(commands)
        parts = [(len(argv), b"".join(map(bulk, argv)), tuple(keys))]
        return cls(operation, key, parts, lambda: commands)


class EntryPacker:
    """The packed form of ``event_log.append_commands``, with per-task parts cached.

    An append packs only its entry's fields and its wake-up; the task's XADD head (key,
    cap), its PEXPIRE commands (both TTLs) and its PUBLISH head are packed once and kept for
    the last ``cached`` tasks. ``tests/events/test_legacy_taps.py`` holds the bytes equal
    to those of ``append_commands``, the format's one definition.
    """

    def __init__(
        self,
        keys: Keys,
        retention: StreamRetention,
        *,
        max_bytes: int = MAX_PAYLOAD_BYTES,
        cached: int = 1024,
    ) -> None:
        self._keys = keys
        self._retention = retention
        self._max_bytes = max_bytes
        self._cached = cached
        self._heads: dict[str, tuple[str, bytes, bytes, bytes, bytes, bytes]] = {}

    def _head(self, task_id: str) -> tuple[str, bytes, bytes, bytes, bytes, bytes]:
        head = self._heads.get(task_id)
        if head is None:
            key, r = self._keys.events(task_id), self._retention
            raw = key.encode()
            xadd = (b"XADD", raw, b"MAXLEN", b"~", b"%d" % r.maxlen, b"*")
            running, terminal = (
                b"".join(map(bulk, (b"3", b"PEXPIRE", raw, b"%d" % int(ttl * 1000))))
                for ttl in (r.idle_ttl, r.terminal_ttl)
            )
            wake = (b"3", self._keys.publish.encode(), self._keys.wake(task_id).encode())
            head = (
                key,
                raw,
                b"".join(map(bulk, xadd)),
                running,
                terminal,
                b"".join(map(bulk, wake)),
            )
            if len(self._heads) >= self._cached:
                del self._heads[next(iter(self._heads))]
            self._heads[task_id] = head
        return head

    def forget(self, task_id: str) -> None:
        """Drop the task's cached parts (its queue closed)."""
        self._heads.pop(task_id, None)

    def write(self, operation: str, task_id: str, version: int, event: Event) -> Write:
        """The write appending ``event`` at ``version`` (``PayloadTooLargeError`` if too big)."""
        key, raw, xadd, running, terminal, wake = self._head(task_id)
        fields = encode_event(version, event, key=key, limit=self._max_bytes)
        flat = [part for item in fields.items() for part in item]
        ends = ends_task_stream(event)
        xadd_part = b"".join([bulk(b"%d" % (6 + len(flat))), xadd, *map(bulk, flat)])
        parts: list[Part] = [
            (7 + len(flat), xadd_part, (raw,)),
            (4, terminal if ends else running, (raw,)),
            (4, wake + bulk(WITH_ENTRY_ID + pack_fields(flat)), ()),
        ]

        def commands() -> list[Command]:
            return append_commands(
                self._keys, task_id, version, event,
                terminal=ends, retention=self._retention, max_bytes=self._max_bytes,
            )  # fmt: skip

        return Write(operation, key, parts, commands)


class GroupedAppends:
    """Writes to tasks' logs, sent together: group commit.

    A write made while no group is on the wire goes out at once, sent by its own caller.
    Writes made while one is on the wire wait, and go out together in the next group: one
    ``EVALSHA`` of ``transaction.BATCH_SCRIPT`` running every write's commands in order,
    so N tasks enqueuing at once cost one round trip, not N. Each caller still returns
    only once its own write ran. Between groups the connection stays checked out while
    writes keep coming (a pool checkout costs about as much Python as the exchange
    itself), and goes back to the pool ``linger`` seconds after the last one.

    Errors: a group the server refuses as a whole (an error reply: the batch script checks
    its keys' types before it writes, and Redis refuses a script's writes for memory only
    at its first) or whose connection is lost is sent again one write at a time, through
    ``run_atomically``: each caller gets its own error or success, and the script cache
    and redis-py's retry policy apply as to any single write. On a Redis Cluster (a group
    would span slots) and with ``Durability`` (``WAIT``), each write is its own
    ``run_atomically``, as without grouping.

    Args:
        redis: The shared client; not owned.
        linger: Seconds without a write after which the connection goes back to the pool.
        max_group: Writes per group, at most.
        max_bytes: Packed bytes per group, about (a group holds at least one write).
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
        self._linger = linger
        self._max_group = max_group
        self._max_bytes = max_bytes
        self._queue: list[Write] = []
        self._busy = False  # a group is being sent (by a caller, or by the sender task)
        self._sender: asyncio.Future[None] | None = None
        self._conn: AbstractConnection | None = None  # held between groups
        self._last = 0.0  # loop time of the last exchange
        self._timer: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Future[Any]] = set()
        self._closed = False

    async def write(self, write: Write, durability: Durability | None = None) -> None:
        """Run ``write`` atomically, grouped with the writes made meanwhile.

        Round trips: 1, shared with the writes made meanwhile (one more if the previous
        group is still on the wire).
        """
        if self._closed or self._pool is None or (durability is not None and durability.waits):
            await run_atomically(
                self._redis, write.operation, write.key, write.commands(), durability
            )
            return
        if self._busy:
            write.future = asyncio.get_running_loop().create_future()
            self._queue.append(write)
            await write.future
            return
        self._busy = True
        try:
            await self._send([write])
        finally:
            self._next()

    def _next(self) -> None:
        """The group in flight is done: let the sender task take what was queued meanwhile.

        Synchronous, like its check of the queue: a write queued later finds ``_busy``
        False and sends itself.
        """
        if self._queue and not self._closed:
            self._sender = asyncio.ensure_future(self._drain())
        else:
            self._busy = False

    async def _drain(self) -> None:
        try:
            while self._queue and not self._closed:
                group, self._queue = self._take()
                with contextlib.suppress(Exception):  # (each of its callers has its answer)
                    await self._send(group)
        finally:
            self._busy = False

    def _take(self) -> tuple[list[Write], list[Write]]:
        """The next group from the queue (at least one write), and what stays queued."""
        size = 0
        for n, write in enumerate(self._queue):
            size += write.size
            if n and (n == self._max_group or size > self._max_bytes):
                return self._queue[:n], self._queue[n:]
        return self._queue, []

    async def _send(self, group: list[Write]) -> None:
        """Send one group and answer its callers (a caller's own write raises here).

        A write whose caller was cancelled while it waited is left out: nobody waits for it.
        """
        group = [w for w in group if w.future is None or not w.future.done()]
        if not group:
            return
        batch = Batch()
        for write in group:
            for count, packed, keys in write.parts:
                batch.add_packed(count, packed, *keys)
        try:
            reply = await self._exchange(batch.packed())
        except (rex.ConnectionError, rex.TimeoutError):
            reply = None
        except Exception:  # (the pool is exhausted): the others try alone, as they would
            await self._one_by_one([w for w in group if w.future is not None])
            raise
        except BaseException:  # cancelled (closing): no caller may wait forever
            _answer(group, ListenerClosedError("the log writer was closed"))
            raise
        if reply == 1:
            _answer(group, None)
            return
        if isinstance(reply, rex.ReadOnlyError):  # a demoted primary: check out afresh
            await self._drop_connection(self._conn)
        await self._one_by_one(group)

    async def _one_by_one(self, group: list[Write]) -> None:
        """Send a failed group's writes again, each alone, each caller its own answer."""
        for write in group:
            future = write.future
            if future is not None and future.done():
                continue  # its caller was cancelled meanwhile
            try:
                await run_atomically(self._redis, write.operation, write.key, write.commands())
            except Exception as e:
                if future is None:
                    raise
                future.set_exception(e)
            else:
                if future is not None:
                    future.set_result(None)

    async def _exchange(self, packed: bytes) -> Any:
        """One packed command's reply on the held connection (checked out if none is held)."""
        conn, pool = self._conn, self._pool
        assert pool is not None
        if conn is None:
            try:
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            except rex.ConnectionError as e:
                raise_if_pool_exhausted(e, "write to a task's log")
                raise
            self._conn = conn
        try:
            (reply,) = await _exchange(conn, packed, 1)
        except BaseException:
            await self._drop_connection(conn)  # mid-reply: unusable
            raise
        if self._closed:  # (closed meanwhile: aclose left it to us)
            self._conn = None
            await pool.release(conn)
            return reply
        self._last = asyncio.get_running_loop().time()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(self._last + self._linger, self._idle)
        return reply

    async def _drop_connection(self, conn: AbstractConnection | None) -> None:
        """Disconnect ``conn`` (the held connection, or was) and return it to the pool."""
        if self._conn is conn:
            self._conn = None
        if conn is not None and self._pool is not None:
            try:
                await conn.disconnect()
            finally:
                await self._pool.release(conn)

    def _idle(self) -> None:
        """Return the held connection once ``linger`` passed without a write."""
        self._timer = None
        conn, loop = self._conn, asyncio.get_running_loop()
        if conn is None or self._pool is None:
            return
        if self._busy or loop.time() < self._last + self._linger:
            self._timer = loop.call_at(max(self._last, loop.time()) + self._linger, self._idle)
            return
        self._conn = None
        released = asyncio.ensure_future(self._pool.release(conn))
        self._releasing.add(released)
        released.add_done_callback(self._releasing.discard)

    async def aclose(self) -> None:
        """Fail the queued writes and return the held connection."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue, self._queue = self._queue, []
        _answer(queue, ListenerClosedError("the log writer was closed"))
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


def _answer(group: list[Write], error: BaseException | None) -> None:
    """Wake the group's waiting callers: done, or ``error``."""
    for write in group:
        future = write.future
        if future is not None and not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
