"""Pub/sub connections for the listener: one per server, or one per Redis Cluster shard.

A :class:`PubSubLink` is one pub/sub connection and the channels subscribed on it, with
its own reader. It hands every message to the listener, re-subscribes its channels after
a reconnect (the listener then backfills from the streams), and never gives up while the
listener is open. On a single server the listener has one link (``SUBSCRIBE``); on a
cluster it has one per primary that owns a subscribed task (``SSUBSCRIBE``: a wake-up
reaches only the shard owning the task), whatever the number of tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode

from a2a_redis.connection import compat
from a2a_redis.connection.cluster import node_client
from a2a_redis.connection.transaction import backoff

__all__ = ["PubSubLink", "node_pubsub", "server_pubsub"]

logger = logging.getLogger(__name__)

Dispatch = Callable[["PubSubLink", dict[str, Any]], None]
Lost = Callable[["PubSubLink", BaseException], Awaitable[None]]


def server_pubsub(redis: Redis) -> tuple[PubSub, Callable[[], Awaitable[None]]]:
    """A ``PubSub`` on a connection of the client's pool, and its closer."""
    pubsub = compat.pubsub(redis)
    return pubsub, pubsub.aclose


def node_pubsub(node: ClusterNode) -> tuple[PubSub, Callable[[], Awaitable[None]]]:
    """A ``PubSub`` on its own connection to one cluster node, and its closer."""
    client = node_client(node)
    pubsub = compat.pubsub(client)

    async def close() -> None:
        try:
            await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis-py 8.2
        finally:
            await client.aclose()

    return pubsub, close


class PubSubLink:
    """One pub/sub connection, its channels and its reader.

    Args:
        name: ``""`` for a single server, else the cluster node's ``host:port``.
        connect: Makes a fresh ``PubSub`` (and the function closing what it opened).
        sharded: Use ``SSUBSCRIBE``/``SUNSUBSCRIBE`` (Redis Cluster shard channels).
        dispatch: Called with every message read.
        lost: Called after the connection failed, before reconnecting (a cluster listener
            re-reads the slot map there and moves channels to their new shards).
        heartbeat: Seconds of silence after which a PING checks the connection.
    """

    def __init__(
        self,
        name: str,
        connect: Callable[[], tuple[PubSub, Callable[[], Awaitable[None]]]],
        *,
        sharded: bool,
        dispatch: Dispatch,
        lost: Lost,
        heartbeat: float,
    ) -> None:
        self.name = name
        self.channels: set[bytes] = set()
        self.connected = False
        self.reconnects = 0
        self._connect = connect
        self._sharded = sharded
        self._dispatch = dispatch
        self._lost = lost
        self._heartbeat = heartbeat
        self._pubsub: PubSub | None = None
        self._close_pubsub: Callable[[], Awaitable[None]] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # redis-py's PubSub is not safe for concurrent commands
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once closed (a cluster link closes itself when left with no channel)."""
        return self._closed

    async def subscribe(self, channel: bytes) -> None:
        """Send a (S)SUBSCRIBE; the server's confirmation arrives through ``dispatch``."""
        self.channels.add(channel)
        if self._pubsub is None:
            self._pubsub, self._close_pubsub = self._connect()
        async with self._lock:
            await self._send(self._pubsub, "subscribe", [channel])
        if self._reader is None or self._reader.done():
            self.connected = True
            self._reader = asyncio.ensure_future(self._read())

    async def unsubscribe(self, channel: bytes) -> None:
        """Drop a channel (best effort: a lost connection forgets it anyway)."""
        self.channels.discard(channel)
        if self._pubsub is None or self._closed:
            return
        try:
            async with self._lock:
                await self._send(self._pubsub, "unsubscribe", [channel])
        except (rex.ConnectionError, rex.TimeoutError) as e:
            logger.debug("unsubscribe failed: %s", e)

    async def _send(self, pubsub: PubSub, verb: str, channels: list[bytes]) -> None:
        if not self._sharded:
            await getattr(pubsub, verb)(*channels)
            return
        for channel in channels:  # one slot per SSUBSCRIBE (CROSSSLOT otherwise)
            await getattr(pubsub, "s" + verb)(channel)

    async def _read(self) -> None:
        attempt = 0
        while not self._closed:
            try:
                if not self.connected:
                    await self._reconnect()
                    attempt = 0
                pubsub = self._pubsub
                assert pubsub is not None
                message = await pubsub.get_message(timeout=self._heartbeat)
                if message is None:
                    async with self._lock:
                        await pubsub.ping()
                    continue
                self._dispatch(self, message)
            except (rex.ConnectionError, rex.TimeoutError, OSError, rex.ResponseError) as e:
                # A ResponseError here is a refused (S)SUBSCRIBE: MOVED after a slot moved.
                attempt += 1
                if self.connected:
                    logger.warning("pub/sub connection %s lost: %s; reconnecting", self.name, e)
                self.connected = False
                with contextlib.suppress(Exception):
                    await self._lost(self, e)
                if not self.channels and self.name:
                    await self.aclose()  # a cluster link left with no channel: let it go
                    return
                await backoff(attempt, base=0.05, cap=2.0)

    async def _reconnect(self) -> None:
        """Replace the connection and subscribe this link's channels again."""
        # Under the lock: a subscriber's UNSUBSCRIBE (or a SUBSCRIBE) may be running on the
        # old pub/sub; closing it under that command broke redis-py (AttributeError).
        async with self._lock:
            old = self._close_pubsub
            self._pubsub, self._close_pubsub = self._connect()
            if old is not None:
                with contextlib.suppress(Exception):
                    await old()
            channels = sorted(self.channels)
            if channels:
                await self._send(self._pubsub, "subscribe", channels)
            else:
                await self._pubsub.ping()
        self.connected = True
        self.reconnects += 1
        logger.warning(
            "pub/sub %s reconnected; re-subscribed %d tasks", self.name or "link", len(channels)
        )

    async def aclose(self) -> None:
        """Stop the reader and close the connection."""
        self._closed = True
        self.connected = False
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        close, self._close_pubsub = self._close_pubsub, None
        self._pubsub = None
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
