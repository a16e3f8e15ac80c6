"""Optimistic transactions in two round trips: (WATCH + reads), then (MULTI ... EXEC).

redis-py's ``Pipeline.watch`` executes WATCH and each read as separate round trips, and its
``transaction()`` helper retries forever. This helper sends WATCH together with the reads in
one write, and MULTI, the queued commands and EXEC in a second, on one pooled connection.
Callers decide, between the two, whether to commit; the retry policy is theirs (bounded).

The connection is returned to the pool clean: after EXEC (which clears WATCH), after an
explicit :meth:`WatchedTransaction.unwatch`, or, on any error, disconnected first.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection, ConnectionPool

__all__ = ["Command", "WatchedTransaction", "backoff", "execute"]

Command = tuple[Any, ...]


async def backoff(attempt: int, base: float = 0.001, cap: float = 0.05) -> None:
    """Sleep a small, jittered, exponentially growing delay before retry ``attempt`` (1-based)."""
    await asyncio.sleep(random.uniform(0, min(cap, base * (2**attempt))))


def _raise_nested(replies: Sequence[Any]) -> None:
    for reply in replies:
        if isinstance(reply, rex.ResponseError):
            raise reply


async def execute(pipe: Pipeline) -> list[Any]:
    """Execute a plain pipeline; raise the first error reply as the server sent it.

    redis-py rewrites pipeline errors ("Command # 1 (...) of pipeline caused error"), which
    hides the documented prefix (WRONGTYPE, ...) that ``errors.redis_errors`` looks for.
    """
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    _raise_nested(replies)
    return replies


class WatchedTransaction:
    """One WATCH ... MULTI/EXEC transaction on one connection of a client's pool.

    Use as ``async with WatchedTransaction(redis) as tx``: ``await tx.watch(keys, reads)``,
    then either ``await tx.commit(commands)`` (None when a watched key changed) or
    ``await tx.unwatch()``.
    """

    __slots__ = ("_clean", "_conn", "_pool")

    def __init__(self, redis: Redis) -> None:
        self._pool: ConnectionPool = redis.connection_pool
        self._conn: AbstractConnection | None = None
        self._clean = True

    async def __aenter__(self) -> WatchedTransaction:
        self._conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
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
            if exc is not None or not self._clean:
                await conn.disconnect()
        finally:
            await self._pool.release(conn)

    async def _roundtrip(self, commands: Sequence[Command]) -> list[Any]:
        conn = self._conn
        assert conn is not None, "use WatchedTransaction as an async context manager"
        self._clean = False
        await conn.send_packed_command(conn.pack_commands(commands))
        replies = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except rex.ResponseError as e:
                replies.append(e)
        return replies

    async def watch(self, keys: Sequence[str], reads: Sequence[Command]) -> list[Any]:
        """WATCH ``keys`` and run ``reads``, in one round trip. Returns the reads' replies."""
        replies = await self._roundtrip([("WATCH", *keys), *reads])
        _raise_nested(replies)
        return replies[1:]

    async def unwatch(self) -> None:
        """Give up the transaction (one round trip)."""
        await self._roundtrip([("UNWATCH",)])
        self._clean = True

    async def commit(self, commands: Sequence[Command]) -> list[Any] | None:
        """Run ``commands`` in MULTI/EXEC. Returns their replies, or None if a watched key changed.

        Raises the first error reply: a queueing error (EXECABORT) or a command that failed
        inside the transaction (for example WRONGTYPE; Redis does not roll the others back).
        """
        replies = await self._roundtrip([("MULTI",), *commands, ("EXEC",)])
        _raise_nested(replies[:-1])
        self._clean = True
        result = replies[-1]
        if isinstance(result, rex.ResponseError):
            raise result
        if result is None:
            return None
        _raise_nested(result)
        return list(result)
