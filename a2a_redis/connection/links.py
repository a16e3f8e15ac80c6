"""Pub/sub transport: one connection per server, or one per Redis Cluster shard.

:class:`PubSubRouter` is the listener's transport, as a backend is to encode/broadcaster's
``Broadcast``: it subscribes and unsubscribes channels, hands every message over, and says
when a channel's subscription was (re)confirmed. It never sees what the channels mean.
On a single server it holds one :class:`PubSubLink` (``SUBSCRIBE``); on a cluster one per
primary that serves a subscribed channel (``SSUBSCRIBE``: a wake-up reaches only the
shard owning the task), whatever the number of channels, and it moves a channel to its
new shard when its slot moves.

A :class:`PubSubLink` is one pub/sub connection, its channels and its reader. It
re-subscribes its channels after a reconnect and never gives up while it is open.

This replaces redis-py's ``PubSub.on_connect`` re-subscription with our own, because we
must also know when a channel was re-subscribed (to backfill from the stream) and route
shard channels to the node that owns their slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode

from a2a_redis import telemetry
from a2a_redis.connection import compat
from a2a_redis.connection.cluster import Client, is_cluster, node_client
from a2a_redis.connection.transaction import backoff
from a2a_redis.errors import RedisUnavailableError

__all__ = ["PubSubLink", "PubSubRouter", "node_pubsub", "server_pubsub"]

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
        self._reconnects = 0  # ours, plus redis-py's own in the PubSubs we replaced
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
    def reconnects(self) -> int:
        """Reconnects of this link: ours, and those redis-py made on its own (CLIENT KILL)."""
        return self._reconnects + _own_reconnects(self._pubsub)

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
            self._reconnects += _own_reconnects(self._pubsub)
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
        self._reconnects += 1
        telemetry.count("reconnects")
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
        self._reconnects += _own_reconnects(self._pubsub)
        self._pubsub = None
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


def _own_reconnects(pubsub: PubSub | None) -> int:
    """Reconnects redis-py made by itself on ``pubsub`` (a ``compat.QuietPubSub``)."""
    return int(getattr(pubsub, "reconnects", 0))


OnMessage = Callable[[bytes, Any], None]
OnSubscribed = Callable[[bytes], None]


class PubSubRouter:
    """The pub/sub links of one process, and which channel is on which.

    Args:
        redis: The shared client (a single server's pub/sub takes one connection of its
            pool; a cluster's links open their own). Not owned.
        on_message: Called with ``(channel, data)`` for every message on a channel.
        on_subscribed: Called with the channel each time the server confirms its
            subscription: first, after a reconnect, and after a slot move. Messages
            published while it was not subscribed were missed.
        heartbeat: Seconds of pub/sub silence after which a PING checks a connection.
        subscribe_timeout: Seconds :meth:`subscribe` waits for the server's confirmation.
    """

    def __init__(
        self,
        redis: Client,
        *,
        on_message: OnMessage,
        on_subscribed: OnSubscribed,
        heartbeat: float = 15.0,
        subscribe_timeout: float = 10.0,
    ) -> None:
        self._redis = redis
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        self._heartbeat = heartbeat
        self._subscribe_timeout = subscribe_timeout
        self._cluster = redis if is_cluster(redis) else None
        self._links: dict[str, PubSubLink] = {}  # "" (one server) or a cluster node's name
        self._link_of: dict[bytes, PubSubLink] = {}  # channels we want, and their link
        self._confirms: dict[bytes, asyncio.Future[None]] = {}
        self._retired_reconnects = 0
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def connected(self) -> bool:
        """True while every link is up (False before the first subscription)."""
        return bool(self._links) and all(link.connected for link in self._links.values())

    @property
    def reconnects(self) -> int:
        """How many times a pub/sub connection was re-established."""
        return self._retired_reconnects + sum(link.reconnects for link in self._links.values())

    @property
    def connections(self) -> int:
        """Pub/sub connections held (one, or one per cluster shard in use)."""
        return len(self._links)

    def is_up(self, channel: bytes) -> bool:
        """Whether the connection ``channel`` is subscribed on is up now."""
        link = self._link_of.get(channel)
        return link is not None and link.connected

    async def subscribe(self, channel: bytes) -> None:
        """Subscribe ``channel`` and wait for the server's confirmation.

        Raises :class:`~a2a_redis.errors.RedisUnavailableError` if it is not confirmed
        within ``subscribe_timeout``, and redis-py's errors if the connection fails.
        """
        confirmed = asyncio.get_running_loop().create_future()
        self._confirms[channel] = confirmed
        try:
            link = await self._link_for(channel)
            self._link_of[channel] = link
            await link.subscribe(channel)
            try:
                await asyncio.wait_for(asyncio.shield(confirmed), self._subscribe_timeout)
            except asyncio.TimeoutError as e:
                raise RedisUnavailableError(
                    "SUBSCRIBE was not confirmed in time", key=channel.decode(errors="replace")
                ) from e
        finally:
            self._confirms.pop(channel, None)

    async def unsubscribe(self, channel: bytes) -> None:
        """Drop ``channel`` (best effort: a lost connection forgets it anyway)."""
        link = self._link_of.pop(channel, None)
        if link is not None and not self._closed:
            await link.unsubscribe(channel)

    async def aclose(self) -> None:
        """Close every link."""
        self._closed = True
        for task in list(self._background):
            task.cancel()
        for link in list(self._links.values()):
            await link.aclose()

    # -- routing -------------------------------------------------------------------------
    async def _link_for(self, channel: bytes) -> PubSubLink:
        """The link a channel belongs on: the one link, or its cluster shard's."""
        node: ClusterNode | None = None
        name = ""
        if self._cluster is not None:
            await self._cluster.initialize()
            node = self._cluster.get_node_from_key(channel)  # type: ignore[arg-type]
            assert node is not None
            name = node.name
        link = self._links.get(name)
        if link is None or link.closed:
            if link is not None:
                self._retired_reconnects += link.reconnects
            redis, at = self._redis, node

            def connect() -> tuple[PubSub, Callable[[], Awaitable[None]]]:
                return server_pubsub(redis) if at is None else node_pubsub(at)  # type: ignore[arg-type]

            link = PubSubLink(
                name,
                connect,
                sharded=self._cluster is not None,
                dispatch=self._dispatch,
                lost=self._lost,
                heartbeat=self._heartbeat,
            )
            self._links[name] = link
        return link

    async def _lost(self, link: PubSubLink, error: BaseException) -> None:
        """A link failed. On a cluster: re-read the slot map, move channels that moved."""
        cluster = self._cluster
        if cluster is None or self._closed:
            return
        if isinstance(error, rex.MovedError):
            await cluster.nodes_manager.move_slot(error)
        else:
            await cluster.nodes_manager.initialize()
        for channel in list(link.channels):
            node = cluster.get_node_from_key(channel)  # type: ignore[arg-type]
            if node is not None and node.name != link.name:
                link.channels.discard(channel)
                if self._link_of.get(channel) is link:
                    self._spawn(self._move(channel))

    async def _move(self, channel: bytes) -> None:
        """Subscribe a channel on the shard that serves it now (confirmed: on_subscribed)."""
        attempt = 0
        while not self._closed and channel in self._link_of:
            try:
                if self._cluster is not None:
                    await self._cluster.nodes_manager.initialize()
                link = await self._link_for(channel)
                self._link_of[channel] = link
                await link.subscribe(channel)
                logger.warning("a wake channel moved to %s", link.name)
                return
            except (rex.RedisError, rex.RedisClusterException, OSError) as e:
                attempt += 1
                logger.warning("moving a wake channel failed: %s", e)
                await backoff(attempt, base=0.05, cap=2.0)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _dispatch(self, link: PubSubLink, message: dict[str, Any]) -> None:
        kind, channel = message.get("type"), message.get("channel")
        if isinstance(kind, bytes):
            kind = kind.decode()
        if not isinstance(channel, bytes):
            return
        if kind == "sunsubscribe" and channel in link.channels:
            # Not ours (unsubscribe() forgets the channel first): the slot moved elsewhere.
            link.channels.discard(channel)
            if self._link_of.get(channel) is link:
                self._spawn(self._move(channel))
            return
        if kind in ("subscribe", "ssubscribe"):
            confirmed = self._confirms.get(channel)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
            if channel in self._link_of:
                self._on_subscribed(channel)
            return
        if kind in ("message", "smessage"):
            self._on_message(channel, message.get("data"))
