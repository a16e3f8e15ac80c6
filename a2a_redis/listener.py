"""Live delivery: one pub/sub connection per process, one feed per task, fanned out in process.

The stream is the record; pub/sub only wakes readers. For each task that has local
subscribers, the listener holds a :class:`Feed`: it is subscribed to the task's wake channel
and, on each wake, reads the new entries once (``XRANGE (last +``) into a small ring shared
by every local subscriber of the task. So an idle subscriber costs no Redis command, and an
event costs one command per replica however many local subscribers it has.

Each subscriber keeps only its position (a stream entry id). A subscriber that falls behind
the ring (it holds ``ring_size`` entries) reads what it missed from the stream itself, so a
slow subscriber neither grows memory nor slows the others; only if the stream was trimmed
past its position (``MAXLEN``) does it fail, with :class:`SubscriberLagError`.

If the pub/sub connection drops, the listener reconnects with capped backoff, re-subscribes
every channel (redis-py does this on connect) and then re-reads every feed from its last
entry: nothing is lost, and subscribers de-duplicate by entry id. Meanwhile subscribers wait.

A stream entry that cannot be decoded (foreign or corrupt bytes, a newer schema) keeps its
place in the feed as a :class:`StreamEntry` whose ``error`` is set, and is logged at
WARNING with its key and entry id: each reader that reaches it decides (the event stream
fails the subscriber that needs it; a legacy remote tap closes). The listener and every
other feed carry on. A wake-up that does not follow the feed's last entry, or whose entry
does not decode, is not trusted: the feed reads the stream instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from a2a.server.events.event_queue import Event
from redis import exceptions as rex
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster

from a2a_redis.cluster import Client
from a2a_redis.codec import decode_event
from a2a_redis.compat import within
from a2a_redis.errors import (
    A2ARedisError,
    CorruptDataError,
    RedisUnavailableError,
    redis_errors,
)
from a2a_redis.keys import Keys
from a2a_redis.links import PubSubLink, node_pubsub, server_pubsub
from a2a_redis.streams import DESTROYED, HEARTBEAT, parse_entry_id, unpack_wake
from a2a_redis.transaction import backoff

__all__ = [
    "Feed",
    "ListenerClosedError",
    "OwnerLostError",
    "Rows",
    "StreamEntry",
    "StreamListener",
    "SubscriberLagError",
    "check_not_trimmed",
    "decode_rows",
    "read_entries",
]

logger = logging.getLogger(__name__)

FETCH_BATCH = 512  # entries per XRANGE
TURN = 64  # entries a subscriber takes at a time: all it can hold while it does not read
FETCH_FEEDS = 256  # XRANGEs per fetch pipeline
Position = tuple[int, int]
Rows = list[tuple[bytes, dict[bytes, bytes]]]


class SubscriberLagError(A2ARedisError):
    """A subscriber fell behind further than the task's stream retains (``MAXLEN``)."""


class ListenerClosedError(A2ARedisError):
    """The listener (its backend) was closed while a subscriber was waiting."""


class OwnerLostError(A2ARedisError):
    """Nothing (no entry, no heartbeat) came from a task's queue owner for too long."""


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One decoded stream entry (or, with ``error`` set, one that could not be decoded)."""

    position: Position
    version: int  # -1: unknown (an undecodable entry whose version could not be read)
    event: Event | None  # None: the task's event queue was closed here, or ``error``
    error: CorruptDataError | None = None


def format_position(position: Position) -> str:
    """A position as a stream entry id."""
    return f"{position[0]}-{position[1]}"


def decode_rows(key: str, rows: Rows) -> list[StreamEntry]:
    """Decode XRANGE rows.

    An undecodable entry becomes a :class:`StreamEntry` carrying the typed error (naming
    the key and the entry id; its version if that much can be read, else -1), logged at
    WARNING without its bytes: readers decide what it means for them.
    """
    out = []
    for entry_id, fields in rows:
        position = parse_entry_id(entry_id)
        try:
            version, event = decode_event(key, fields)
        except CorruptDataError as e:
            where = format_position(position)
            logger.warning("%s: stream entry %s cannot be read: %s", key, where, e.reason)
            error = type(e)(f"stream entry {where} cannot be read: {e.reason}", key=key)
            out.append(StreamEntry(position, _version_hint(fields), None, error))
            continue
        out.append(StreamEntry(position, version, event))
    return out


def _version_hint(fields: dict[bytes, bytes]) -> int:
    """The version an undecodable entry names, if it is of our schema; -1 if unknown."""
    raw = fields.get(b"v")
    if fields.get(b"f") != b"1" or raw is None or not raw.isdigit() or len(raw) > 18:
        return -1
    return int(raw)


async def read_entries(
    redis: Client, key: str, after: Position, *, check_trim: bool = False, count: int = FETCH_BATCH
) -> tuple[list[StreamEntry], Position]:
    """Entries after ``after`` (one batch of ``count``), and the position of the last row read.

    With ``check_trim`` (one more round trip), raises :class:`SubscriberLagError` if
    entries after ``after`` were trimmed away before they could be read.
    """
    rows = cast(
        Rows, await redis.xrange(key, min="(" + format_position(after), max="+", count=count)
    )
    if check_trim and after != (0, 0):
        await check_not_trimmed(redis, key, after)
    last = parse_entry_id(rows[-1][0]) if rows else after
    return decode_rows(key, rows), last


async def check_not_trimmed(redis: Client, key: str, after: Position) -> None:
    """Raise :class:`SubscriberLagError` if entries after ``after`` may have been trimmed.

    ``after`` (0, 0) asks whether anything was ever trimmed. Otherwise ``after`` is the
    position of an entry this reader has seen: if the stream now starts beyond it, that
    entry was trimmed (``MAXLEN``), and so may have been its successors. This errs on the
    side of telling: a reader is never left to skip events silently. (``XINFO STREAM``'s
    ``max-deleted-entry-id`` does not help: trimming does not move it, only XDEL does.)
    """
    try:
        info: dict[Any, Any] = await redis.xinfo_stream(key)
    except rex.ResponseError:
        return  # no such stream (expired or destroyed): nothing was trimmed after us
    first = info.get("first-entry")
    if first is None:
        return
    if after == (0, 0):
        added, length = info.get("entries-added"), info.get("length")
        lost = added is not None and length is not None and int(added) > int(length)
    else:
        lost = parse_entry_id(first[0]) > after
    if lost:
        raise SubscriberLagError(
            f"events after {format_position(after)} were trimmed (MAXLEN) before this "
            "reader could read them",
            key=key,
        )


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds (without a new Task on 3.11+)."""
    with contextlib.suppress(TimeoutError):
        await within(event.wait(), timeout)


class Feed:
    """The live entries of one task, shared by its local subscribers."""

    def __init__(self, task_id: str, key: str, channel: str, ring_size: int) -> None:
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
        self.link: PubSubLink | None = None  # the pub/sub connection its channel is on

    def entries_after(self, position: Position, limit: int = TURN) -> list[StreamEntry] | None:
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

    def notify(self) -> None:
        """Wake every subscriber waiting on this feed."""
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class StreamListener:
    """One pub/sub connection and the feeds of every task with local subscribers.

    Args:
        redis: The shared client (pub/sub takes one connection of its pool; fetches use
            the pool like any command). Not owned: never closed here.
        keys: The namespace's key builder.
        ring_size: Entries kept per task for local subscribers (default 256).
        heartbeat: Seconds of pub/sub silence after which a PING checks the connection.
        subscribe_timeout: Seconds to wait for the server to confirm a SUBSCRIBE.
    """

    def __init__(
        self,
        redis: Client,
        keys: Keys,
        *,
        ring_size: int = 256,
        heartbeat: float = 15.0,
        subscribe_timeout: float = 10.0,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._ring_size = ring_size
        self._heartbeat = heartbeat
        self._subscribe_timeout = subscribe_timeout
        self._feeds: dict[str, Feed] = {}
        self._by_channel: dict[bytes, Feed] = {}
        self._confirms: dict[bytes, asyncio.Future[None]] = {}
        self._sharded = isinstance(redis, RedisCluster)
        self._links: dict[str, PubSubLink] = {}  # "" (one server) or a cluster node's name
        self._retired_reconnects = 0
        self._due: dict[str, Feed] = {}  # feeds with entries to fetch, in wake order
        self._in_flight: set[str] = set()  # feeds whose fetch is on the wire
        self._fetch_due = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._fetcher: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        """True while every pub/sub connection is up (False before the first subscriber)."""
        return bool(self._links) and all(link.connected for link in self._links.values())

    @property
    def reconnects(self) -> int:
        """How many times a pub/sub connection was re-established."""
        return self._retired_reconnects + sum(link.reconnects for link in self._links.values())

    # -- public --------------------------------------------------------------------------
    def stats(self) -> dict[str, int | bool]:
        """Feeds (tasks), local subscribers, connection state, reconnect count."""
        return {
            "connected": self.connected,
            "tasks": len(self._feeds),
            "subscribers": sum(f.refs for f in self._feeds.values()),
            "reconnects": self.reconnects,
            "connections": len(self._links),
        }

    async def join(self, task_id: str) -> Feed:
        """Register a local subscriber of ``task_id``; returns once its feed is live."""
        if self._closed:
            raise ListenerClosedError("the listener is closed")
        feed = self._feeds.get(task_id)
        if feed is None:
            channel = self._keys.wake(task_id)
            feed = Feed(task_id, self._keys.events(task_id), channel, self._ring_size)
            self._feeds[task_id] = feed
            self._by_channel[channel.encode()] = feed
            feed.ready = asyncio.ensure_future(self._start(feed))
        feed.refs += 1
        try:
            assert feed.ready is not None
            await asyncio.shield(feed.ready)
        except BaseException:
            await self.leave(feed)
            raise
        return feed

    async def leave(self, feed: Feed) -> None:
        """Unregister a local subscriber; the last one out unsubscribes the channel."""
        feed.refs -= 1
        if feed.refs > 0 or self._feeds.get(feed.task_id) is not feed:
            return
        del self._feeds[feed.task_id]
        self._by_channel.pop(feed.channel.encode(), None)
        if feed.link is not None and not self._closed:
            await feed.link.unsubscribe(feed.channel.encode())

    async def follow(
        self,
        task_id: str,
        start: Callable[[], Awaitable[tuple[list[StreamEntry], Position]]],
        *,
        idle_timeout: float | Callable[[], float | None] | None = None,
    ) -> AsyncGenerator[StreamEntry, None]:
        """Yield a task's stream entries: those ``start`` returns, then every later one.

        The feed is joined before ``start`` runs, so no entry written meanwhile is missed;
        ``start`` returns its entries and the position just before them. Entries are
        yielded once each, in stream order (de-duplicated by position), from the shared
        ring, or from the stream itself when this reader has fallen behind the ring; at
        most :data:`TURN` at a time, so a reader that stops reading holds no more than
        that (what it has not read stays in the ring or in Redis). Never ends by itself,
        except when the stream is destroyed (it returns); with ``idle_timeout`` (seconds,
        or a function giving them, None while no owner is expected), raises
        :class:`OwnerLostError` after that long without an entry or an owner heartbeat.
        Silence is counted only while the pub/sub connection is up: after a reconnect the
        owner gets a whole ``idle_timeout`` again.
        """
        key = self._keys.events(task_id)
        feed = await self.join(task_id)
        loop = asyncio.get_running_loop()
        joined = loop.time()
        try:
            with redis_errors("read the task's stream", key):
                pending, position = await start()
            pending = pending[:TURN]  # the rest is read again, from the ring or the stream
            read_up_to = position
            while True:
                for entry in pending:
                    if entry.position > position:
                        position = entry.position
                        yield entry
                entry = pending = None  # type: ignore[assignment]  # pin nothing while idle
                position = max(position, read_up_to)
                if feed.ended is not None:
                    raise feed.ended
                if feed.destroyed:
                    return
                changed = feed.changed
                ring = feed.entries_after(position)
                if ring is None:  # fell behind the shared ring: catch up from the stream
                    pending, read_up_to = await self._catch_up(key, position)
                    continue
                pending = ring
                if ring:
                    continue
                timeout = idle_timeout() if callable(idle_timeout) else idle_timeout
                if timeout is None:
                    await changed.wait()
                    continue
                remaining = max(feed.alive_at, joined) + timeout - loop.time()
                if remaining > 0:
                    await _wait(changed, remaining)
                elif feed.link is not None and feed.link.connected:
                    raise OwnerLostError(
                        f"no event or heartbeat from the task's owner for {timeout}s", key=key
                    )
                else:  # our own connection is down: the owner's silence proves nothing
                    await changed.wait()
        finally:
            await self.leave(feed)

    async def _catch_up(self, key: str, position: Position) -> tuple[list[StreamEntry], Position]:
        """Read entries after ``position`` for a reader behind the ring; wait out outages."""
        attempt = 0
        while True:
            try:
                with redis_errors("catch up with the task's stream", key, connection=False):
                    return await read_entries(
                        self._redis, key, position, check_trim=True, count=TURN
                    )
            except (rex.ConnectionError, rex.TimeoutError) as e:
                if self._closed:
                    raise ListenerClosedError("the listener was closed", key=key) from e
                attempt += 1
                if attempt == 1:
                    logger.warning("catch-up read failed: %s; retrying", e)
                await backoff(attempt, base=0.02, cap=2.0)

    async def aclose(self) -> None:
        """Stop the reader, end every waiting subscriber, release the pub/sub connection."""
        self._closed = True
        error = ListenerClosedError("the listener was closed")
        for feed in list(self._feeds.values()):
            feed.ended = error
            feed.notify()
        if self._fetcher is not None:
            self._fetcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._fetcher
        for link in list(self._links.values()):
            await link.aclose()

    # -- feed start and fetch ------------------------------------------------------------
    async def _start(self, feed: Feed) -> None:
        """(S)SUBSCRIBE (confirmed by the server), then note the stream's current end."""
        channel = feed.channel.encode()
        confirmed = asyncio.get_running_loop().create_future()
        self._confirms[channel] = confirmed
        try:
            with redis_errors("subscribe", feed.channel):
                feed.link = await self._link_for(channel)
                await feed.link.subscribe(channel)
                try:
                    await asyncio.wait_for(asyncio.shield(confirmed), self._subscribe_timeout)
                except asyncio.TimeoutError as e:
                    raise RedisUnavailableError(
                        "SUBSCRIBE was not confirmed in time", key=feed.channel
                    ) from e
            with redis_errors("read the end of the task's stream", feed.key):
                tail = cast(Rows, await self._redis.xrevrange(feed.key, count=1))
        finally:
            self._confirms.pop(channel, None)
        start = parse_entry_id(tail[0][0]) if tail else (0, 0)
        feed.covered_from = start
        feed.last = start
        if feed.dirty:
            self._wake(feed)

    def _wake(self, feed: Feed) -> None:
        """Queue a fetch of the feed's new entries (one fetcher serves every feed)."""
        if feed.last is None:
            feed.dirty = True  # _start fetches once the feed's position is known
            return
        self._due[feed.task_id] = feed
        self._fetch_due.set()
        if self._fetcher is None or self._fetcher.done():
            self._fetcher = asyncio.ensure_future(self._fetch_loop())

    async def _fetch_loop(self) -> None:
        """Read new entries for every woken feed: one pipeline of XRANGEs per round trip.

        So a replica uses one connection for live delivery however many tasks are busy,
        and woken tasks share round trips. A failed read is retried, with capped backoff,
        for as long as the listener is open: a subscriber waits, it is never forgotten.
        """
        attempt = 0
        while not self._closed:
            if not self._due:
                self._fetch_due.clear()
                await self._fetch_due.wait()
                continue
            try:
                await self._fetch_batch()
            except (rex.ConnectionError, rex.TimeoutError) as e:
                attempt += 1
                if attempt == 1:
                    logger.warning("fetching tasks' events failed: %s; retrying", e)
                await backoff(attempt, base=0.02, cap=1.0)
                continue
            attempt = 0

    async def _fetch_batch(self) -> None:
        """One pipeline of XRANGEs for up to FETCH_FEEDS woken feeds (requeued on failure).

        A method of its own so that nothing of the batch stays referenced while the loop
        waits for the next wake-up: a feed whose subscribers left must be freed.
        """
        batch = [self._due.pop(task_id) for task_id in list(self._due)[:FETCH_FEEDS]]
        self._in_flight = {feed.task_id for feed in batch}
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for feed in batch:
                    assert feed.last is not None
                    start = "(" + format_position(feed.last)
                    pipe.xrange(feed.key, min=start, max="+", count=FETCH_BATCH)
                replies = await pipe.execute(raise_on_error=False)
        except (rex.ConnectionError, rex.TimeoutError):
            for feed in batch:
                self._due.setdefault(feed.task_id, feed)
            raise
        finally:
            self._in_flight = set()
        for feed, rows in zip(batch, replies, strict=True):
            if self._feeds.get(feed.task_id) is not feed:
                continue  # its last subscriber left meanwhile
            if isinstance(rows, Exception):
                feed.ended = CorruptDataError(f"cannot read the stream: {rows}", key=feed.key)
                feed.notify()
                continue
            if rows:
                feed.extend(decode_rows(feed.key, rows), parse_entry_id(rows[-1][0]))
            if len(rows) == FETCH_BATCH:
                self._due[feed.task_id] = feed  # more to read

    # -- pub/sub links -------------------------------------------------------------------
    async def _link_for(self, channel: bytes) -> PubSubLink:
        """The link a channel belongs on: the one link, or its cluster shard's."""
        if not isinstance(self._redis, RedisCluster):
            name, node = "", None
        else:
            await self._redis.initialize()
            node = self._redis.get_node_from_key(channel)  # type: ignore[arg-type]
            assert node is not None
            name = node.name
        link = self._links.get(name)
        if link is None or link.closed:
            if link is not None:
                self._retired_reconnects += link.reconnects
            if node is None:
                redis = self._redis

                def connect() -> tuple[PubSub, Callable[[], Awaitable[None]]]:
                    return server_pubsub(redis)  # type: ignore[arg-type]

            else:
                at = node

                def connect() -> tuple[PubSub, Callable[[], Awaitable[None]]]:
                    return node_pubsub(at)

            link = PubSubLink(
                name,
                connect,
                sharded=self._sharded,
                dispatch=self._dispatch,
                lost=self._lost,
                heartbeat=self._heartbeat,
            )
            self._links[name] = link
        return link

    async def _lost(self, link: PubSubLink, error: BaseException) -> None:
        """A link failed. On a cluster: re-read the slot map, move channels that moved."""
        if not isinstance(self._redis, RedisCluster) or self._closed:
            return
        if isinstance(error, rex.MovedError):
            await self._redis.nodes_manager.move_slot(error)
        else:
            await self._redis.nodes_manager.initialize()
        for channel in list(link.channels):
            node = self._redis.get_node_from_key(channel)  # type: ignore[arg-type]
            if node is not None and node.name != link.name:
                link.channels.discard(channel)
                feed = self._by_channel.get(channel)
                if feed is not None:
                    self._spawn(self._move(feed))

    async def _move(self, feed: Feed) -> None:
        """Subscribe a feed's channel on the shard that owns it now (it backfills on confirm)."""
        attempt = 0
        channel = feed.channel.encode()
        while not self._closed and self._by_channel.get(channel) is feed:
            try:
                if isinstance(self._redis, RedisCluster):
                    await self._redis.nodes_manager.initialize()
                feed.link = await self._link_for(channel)
                await feed.link.subscribe(channel)
                logger.warning("task %r's wake channel moved to %s", feed.task_id, feed.link.name)
                return
            except (rex.RedisError, rex.RedisClusterException, OSError) as e:
                attempt += 1
                logger.warning("moving task %r's wake channel failed: %s", feed.task_id, e)
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
            # Not ours (leave() forgets the channel first): the slot moved to another shard.
            link.channels.discard(channel)
            feed = self._by_channel.get(channel)
            if feed is not None:
                self._spawn(self._move(feed))
            return
        if kind in ("subscribe", "ssubscribe"):
            confirmed = self._confirms.get(channel)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
            feed = self._by_channel.get(channel)
            if feed is not None and feed.last is not None:
                self._wake(feed)  # re-subscribed after a reconnect or a slot move: backfill
                # Owners' heartbeats could not reach us meanwhile: a whole lease again.
                feed.alive_at = asyncio.get_running_loop().time()
                feed.notify()
            return
        feed = self._by_channel.get(channel)
        if feed is not None and kind in ("message", "smessage"):
            self._on_message(feed, message.get("data"))

    def _on_message(self, feed: Feed, data: Any) -> None:
        """A wake-up on a feed's channel: an entry it carries, a fetch, or an end."""
        if data == DESTROYED:
            feed.destroyed = True
            feed.notify()
        elif data == HEARTBEAT:
            feed.alive_at = asyncio.get_running_loop().time()
            feed.notify()
        elif not (isinstance(data, bytes) and self._take_carried(feed, data)):
            self._wake(feed)

    def _take_carried(self, feed: Feed, data: bytes) -> bool:
        """Deliver the entry a wake-up carries, without an XRANGE, when that is safe.

        Every append publishes its entry in the same script as the XADD, with the id of
        the entry it follows, and pub/sub delivers in order. So the carried entry is taken
        when it follows ``feed.last`` exactly and no fetch for this feed is pending or in
        flight (then the fetch must go first, and this wake-up joins it). An entry another
        writer added without a wake-up, in between, makes the feed fetch: it is read, not
        jumped over. False means: fetch instead.
        """
        if feed.last is None or feed.task_id in self._due or feed.task_id in self._in_flight:
            return False
        carried = unpack_wake(data)
        if carried is None:
            return False
        prev, entry_id, fields = carried
        position = parse_entry_id(entry_id)
        if position > feed.last:
            if parse_entry_id(prev) != feed.last:
                return False
            try:
                version, event = decode_event(feed.key, fields)
            except CorruptDataError as e:  # not trusted: the stream itself decides
                logger.warning(
                    "%s: a wake-up carries an unreadable entry (%s); reading the stream",
                    feed.channel, e.reason,
                )  # fmt: skip
                return False
            feed.extend([StreamEntry(position, version, event)], position)
        return True
