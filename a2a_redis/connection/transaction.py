"""Optimistic transactions in two round trips: (WATCH + reads), then (MULTI ... EXEC).

redis-py's ``Pipeline.watch`` executes WATCH and each read as separate round trips, and its
``transaction()`` helper retries forever. This helper sends WATCH together with the reads in
one write, and MULTI, the body and EXEC in a second, on one pooled connection. Callers
decide, between the two, whether to commit; the retry policy is theirs (bounded).

The body of a commit is a list of commands run by one ``EVALSHA`` of :data:`BATCH_SCRIPT`
inside the MULTI: the server applies them exactly as if queued one by one (EXEC still
aborts if a watched key changed), but the client reads three replies, not one per command.

Commands are packed in ``batch.py`` (:class:`Batch` takes parts its callers cached) and
written straight to the connection; replies are read straight from redis-py's hiredis
reader (one pass per round trip instead of redis-py's layers per reply). The connection
is returned to the pool clean: after EXEC (which clears WATCH), after an explicit
:meth:`WatchedTransaction.unwatch`, or, on error, disconnected.
``telemetry`` counts the round trips and retries of the operation in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import sys
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from redis import __version__ as redis_version
from redis import exceptions as rex
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.connection import AbstractConnection, ConnectionPool

from a2a_redis import telemetry
from a2a_redis.connection.batch import (
    BATCH,
    BATCH_BODY,
    BATCH_SCRIPT,
    WITH_ENTRY_ID,
    Batch,
    Command,
    batch_args,
    bulk,
    pack,
    resp,
)
from a2a_redis.connection.cluster import (
    REDIRECTS,
    Client,
    SlotMovedError,
    checkout,
    is_cluster,
    note_redirect,
)
from a2a_redis.connection.durability import Durability, run_script
from a2a_redis.errors import raise_if_pool_exhausted, redis_errors

__all__ = [
    "BATCH_BODY", "BATCH_SCRIPT", "FALLBACK", "WITH_ENTRY_ID", "Batch", "Command",
    "WatchedTransaction", "backoff", "batch_args", "bulk", "call_packed", "execute", "pack",
    "run_atomically",
]  # fmt: skip

# redis-py 8 reads without its own per-reply timeout when given math.inf; Python 3.11 has
# asyncio.timeout. With both, a round trip pays one timeout instead of one per reply.
_ONE_TIMEOUT = sys.version_info >= (3, 11) and int(redis_version.split(".")[0]) >= 8
_MULTI, _EXEC, _UNWATCH = pack([("MULTI",)]), pack([("EXEC",)]), pack([("UNWATCH",)])
try:  # replies are read from redis-py's hiredis reader directly (see _read_hiredis)
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
    from redis._parsers.hiredis import _AsyncHiredisParser as _HiredisParser
except ImportError:  # pragma: no cover - another redis-py layout: read_response per reply
    _HiredisParser, _NOT_ENOUGH_DATA = None, None  # type: ignore[assignment,misc]
#: What :func:`call_packed` returns when the caller must use redis-py's own path.
FALLBACK: Any = object()


async def backoff(attempt: int, base: float = 0.001, cap: float = 0.05) -> None:
    """Sleep a small, jittered, exponentially growing delay before retry ``attempt`` (1-based)."""
    telemetry.retried()
    await asyncio.sleep(random.uniform(0, min(cap, base * (2**attempt))))


async def _send(conn: AbstractConnection, packed: bytes) -> None:
    """Write ``packed`` on ``conn`` (to its stream writer if connected, no health check due)."""
    # redis-py's send_packed_command makes a task per write (a wait_for that our one
    # timeout per round trip covers); it also connects and checks health when needed.
    writer: asyncio.StreamWriter | None = getattr(conn, "_writer", None)
    if writer is None or (
        conn.health_check_interval
        and asyncio.get_running_loop().time() > getattr(conn, "next_health_check", math.inf)
    ):
        await conn.send_packed_command(packed)
        return
    if writer.transport.is_closing():
        raise rex.ConnectionError("Connection closed by the server before write")
    try:
        writer.writelines((packed,))  # (what redis-py calls: fakeredis has no write)
        buffered = getattr(writer.transport, "get_write_buffer_size", None)
        if buffered is None or buffered():  # only what the socket did not take can wait
            await writer.drain()
    except OSError as e:
        raise rex.ConnectionError(f"Error while writing to socket: {e}") from e


async def _exchange(
    conn: AbstractConnection, packed: bytes, count: int, wait: float = 0.0
) -> list[Any]:
    """Send ``packed`` and read ``count`` replies (error replies returned, not raised)."""
    telemetry.round_trip()
    await _send(conn, packed)
    if _ONE_TIMEOUT:  # one timeout for the whole round trip, not one per reply
        deadline = getattr(conn, "socket_timeout", None)
        try:
            async with asyncio.timeout(None if deadline is None else deadline + wait):
                return await _read(conn, count, math.inf)
        except TimeoutError as e:
            where = f"{getattr(conn, 'host', '?')}:{getattr(conn, 'port', '?')}"
            raise rex.TimeoutError(f"Timeout reading from {where}") from e
    return await _read(conn, count, None)  # pragma: no cover - older stacks


async def _read(conn: AbstractConnection, count: int, timeout: float | None) -> list[Any]:
    parser = getattr(conn, "_parser", None)
    if (  # a real socket under redis-py's hiredis parser (not, say, fakeredis)
        type(parser) is _HiredisParser
        and getattr(parser, "_connected", False)
        and type(getattr(parser, "_stream", None)) is asyncio.StreamReader
    ):
        return await _read_hiredis(conn, parser, count)
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await conn.read_response(timeout=timeout))
        except rex.ResponseError as e:
            replies.append(e)
    return replies


async def _read_hiredis(conn: AbstractConnection, parser: Any, count: int) -> list[Any]:
    """``count`` replies straight from the connection's hiredis reader and stream.

    What redis-py's ``read_response`` does per reply (push messages, RESP3, go to the
    parser's handler), in one loop per round trip; a failure leaves the connection to the
    caller to disconnect.
    """
    reader, stream = parser._reader, parser._stream
    push = getattr(parser, "_hiredis_PushNotificationType", None) or ()
    replies: list[Any] = []
    try:
        while len(replies) < count:
            reply = reader.gets()
            if reply is _NOT_ENOUGH_DATA:
                data = await stream.read(parser._read_size)
                if not data:
                    raise rex.ConnectionError("Connection closed by server.")
                reader.feed(data)
            elif isinstance(reply, push):
                await parser.handle_push_response(reply)
            elif isinstance(reply, rex.ConnectionError):  # LOADING and the like, as redis-py
                raise reply
            else:
                replies.append(reply)
    except OSError as e:
        where = f"{getattr(conn, 'host', '?')}:{getattr(conn, 'port', '?')}"
        raise rex.ConnectionError(f"Error while reading from {where}: {e.args}") from e
    if conn.health_check_interval:
        conn.next_health_check = asyncio.get_running_loop().time() + conn.health_check_interval
    return replies


async def call_packed(redis: Client, packed: bytes) -> Any:
    """One packed command's reply (error replies returned) on a pooled connection, or FALLBACK.

    Below redis-py's command machinery. :data:`FALLBACK` tells the caller to go through
    redis-py: on a cluster, and after a connection error (its retry policy then applies).
    """
    if is_cluster(redis):
        return FALLBACK
    pool: ConnectionPool = redis.connection_pool
    try:
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    except rex.ConnectionError as e:
        raise_if_pool_exhausted(e)
        raise
    reply: Any = FALLBACK
    try:
        (reply,) = await _exchange(conn, packed, 1)
    except BaseException as e:
        await conn.disconnect()  # mid-reply: unusable
        if not isinstance(e, (rex.ConnectionError, rex.TimeoutError)):
            raise
    finally:
        await pool.release(conn)
    return reply


def _raise_nested(replies: Sequence[Any]) -> None:
    for reply in replies:
        if isinstance(reply, rex.ResponseError):
            raise reply


async def execute(pipe: Pipeline | ClusterPipeline) -> list[Any]:
    """Execute a plain pipeline; raise the first error reply as the server sent it.

    redis-py rewrites pipeline errors ("Command # 1 (...) of pipeline caused error"), which
    hides the documented prefix (WRONGTYPE, ...) that ``errors.redis_errors`` looks for.
    """
    telemetry.round_trip()
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    _raise_nested(replies)
    return replies


async def run_atomically(
    redis: Client,
    operation: str,
    key: str,
    commands: list[Command],
    durability: Durability | None = None,
) -> None:
    """Run ``commands`` atomically as one scripted batch: one command, one round trip.

    A script runs atomically by itself; without a WATCH there is no need for MULTI. The
    script is loaded on the first NOSCRIPT reply (redis-py's ``Script`` does that). With
    ``durability``, a ``WAIT`` follows in the same round trip (see ``durability.py``).
    """
    keys, argv = batch_args(commands)
    with redis_errors(operation, key):
        if durability is None or not durability.waits:  # one EVALSHA, packed here
            reply = await call_packed(
                redis, resp([b"EVALSHA", BATCH.sha, b"%d" % len(keys), *keys, *argv])
            )
            if isinstance(reply, rex.ResponseError) and not isinstance(reply, rex.NoScriptError):
                raise reply
            if reply is not FALLBACK and not isinstance(reply, rex.NoScriptError):
                return
        await run_script(redis, redis.register_script(BATCH_SCRIPT), keys, argv, durability, key)


class WatchedTransaction:
    """One WATCH ... MULTI/EXEC transaction on one connection.

    Use as ``async with WatchedTransaction(redis, key) as tx``: ``await tx.watch(keys,
    reads)``, then either ``await tx.commit(commands)`` (None when a watched key changed)
    or ``await tx.unwatch()``. ``key`` names the slot: on a Redis Cluster the connection
    comes from the primary owning it (every key of the transaction must share its hash
    tag), and a redirect (``MOVED``, ``ASK``, ``TRYAGAIN``) raises
    :class:`~a2a_redis.connection.cluster.SlotMovedError` after updating the slot map, so that the
    caller's retry goes to the new owner. Elsewhere it comes from the client's pool. With
    ``durability``, a successful commit is confirmed by ``WAIT`` in the same round trip
    (``ReplicationTimeoutError`` if too few replicas).
    """

    __slots__ = ("_clean", "_conn", "_key", "_redis", "_release", "_wait", "_watched")

    def __init__(self, redis: Client, key: str, durability: Durability | None = None) -> None:
        self._redis = redis
        self._key = key
        self._conn: AbstractConnection | None = None
        self._release: Callable[[AbstractConnection], Any] | None = None
        self._clean = True
        self._wait = durability if durability is not None and durability.waits else None
        self._watched: tuple[bytes, list[Any]] = (b"", [])

    async def __aenter__(self) -> WatchedTransaction:
        try:
            if is_cluster(self._redis):
                self._conn, self._release = await checkout(self._redis, self._key)
            else:
                pool: ConnectionPool = self._redis.connection_pool
                self._conn = await pool.get_connection()  # type: ignore[no-untyped-call]
                self._release = pool.release
        except rex.ConnectionError as e:
            raise_if_pool_exhausted(e)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if not self._clean:  # mid-transaction or mid-reply: the connection is unusable
                await conn.disconnect()
        finally:
            assert self._release is not None
            released = self._release(conn)
            if released is not None:
                await released
        if (
            is_cluster(self._redis)
            and isinstance(exc, rex.ConnectionError)
            and not isinstance(exc, SlotMovedError)
        ):  # the node may have failed over: reload the slot map
            with contextlib.suppress(rex.RedisError, OSError):
                await self._redis.nodes_manager.initialize()

    async def _redirected(self, replies: Sequence[Any]) -> None:
        """Raise :class:`SlotMovedError` if a reply says the slot is served elsewhere."""
        for reply in replies:
            if isinstance(reply, REDIRECTS) and is_cluster(self._redis):
                raise await note_redirect(self._redis, reply, self._key)

    async def _roundtrip(self, packed: bytes, count: int, wait: float = 0.0) -> list[Any]:
        conn = self._conn
        assert conn is not None, "use WatchedTransaction as an async context manager"
        self._clean = False
        return await _exchange(conn, packed, count, wait)

    async def watch(self, keys: Sequence[str], reads: Sequence[Command]) -> list[Any]:
        """WATCH ``keys`` and run ``reads``, in one round trip. Returns the reads' replies."""
        return await self.watch_packed(pack([("WATCH", *keys), *reads]), len(reads))

    async def watch_packed(self, packed: bytes, reads: int) -> list[Any]:
        """:meth:`watch`, with the WATCH and the ``reads`` commands already packed."""
        replies = await self._roundtrip(packed, reads + 1)
        await self._redirected(replies)
        _raise_nested(replies)
        self._watched = (packed, replies[1:])  # to watch again after a NOSCRIPT (commit)
        return replies[1:]

    async def unwatch(self) -> None:
        """Give up the transaction (one round trip)."""
        await self._roundtrip(_UNWATCH, 1)
        self._clean = True

    async def commit(self, commands: Sequence[Command] | Batch) -> list[Any] | None:
        """Apply ``commands`` atomically (one scripted batch in MULTI/EXEC).

        Returns ``[]`` on success, or None if a watched key changed (nothing was written).
        If the server had not loaded the batch script (a restarted or newly promoted
        server: scripts are not replicated), it is loaded, the keys are watched and read
        again and, if the reads are unchanged, the commit is sent again (+2 round trips).
        Raises the first error reply, for example WRONGTYPE from a command of the batch
        (commands before it stay applied, as in Redis).
        """
        if isinstance(commands, Batch):
            batch = commands
        else:
            batch = Batch()
            for command in commands:
                batch.add(command)
        body = [_MULTI, batch.packed(), _EXEC]
        if self._wait is not None:
            body.append(pack([self._wait.wait_command()]))
        replies = await self._roundtrip(
            b"".join(body), len(body), self._wait.timeout if self._wait is not None else 0.0
        )
        await self._redirected(replies)
        _raise_nested(replies[:2])
        self._clean = True
        result = replies[2]
        if isinstance(result, rex.ResponseError):
            raise result
        if result is None:
            return None
        if isinstance(result[0], rex.NoScriptError) or str(result[0]).startswith("NOSCRIPT"):
            watch, seen = self._watched
            self._watched = (b"", [])  # once: a script flushed again counts as a lost race
            replies = await self._roundtrip(
                pack([("SCRIPT", "LOAD", batch.script.source)]) + watch, len(seen) + 2
            )
            await self._redirected(replies)
            _raise_nested(replies)
            if not watch or replies[2:] != seen:
                await self.unwatch()
                return None
            return await self.commit(batch)  # the reads the caller decided on still hold
        _raise_nested(result)
        if self._wait is not None:  # the batch's first command names the task's key
            self._wait.check(replies[3], batch.first_key.decode(errors="replace"))
        return []
