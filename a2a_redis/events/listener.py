"""Live fan-out: one feed per task with local subscribers, over one pub/sub transport.

The stream is the record; pub/sub only wakes readers. A :class:`TaskFeed` is subscribed
to its task's wake channel and, on each wake, reads the new entries once (``XRANGE``, or
the entry the wake-up carries) into a small ring shared by every local subscriber. An idle
subscriber costs no command, and an event costs one per replica. A subscriber keeps only
its position; one that falls behind the ring reads what it missed from the stream itself,
and fails with ``SubscriberLagError`` only if ``MAXLEN`` trimmed it away. After a
reconnect (``connection/links.py``) every feed re-reads from its last entry: nothing is
lost, and subscribers de-duplicate by entry id. An undecodable entry keeps its place, with
its typed error, for each reader to decide. See ``docs/architecture.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from redis import exceptions as rex

from a2a_redis.connection.cluster import Client
from a2a_redis.connection.links import PubSubRouter
from a2a_redis.connection.transaction import backoff
from a2a_redis.errors import (
    CorruptDataError,
    ListenerClosedError,
    redis_errors,
)
from a2a_redis.events.feed import SUBSCRIBER_BATCH, FeedReader, TaskFeed
from a2a_redis.events.reads import PipelinedReads
from a2a_redis.log.event_log import (
    DESTROYED,
    FETCH_BATCH,
    HEARTBEAT,
    Position,
    StreamEntry,
    carried_entry,
    decode_rows,
    format_position,
    parse_entry_id,
    read_entries,
)
from a2a_redis.log.keys import Keys

__all__ = ["StreamListener"]

logger = logging.getLogger(__name__)

FETCH_FEEDS = 256  # XRANGEs per fetch pipeline


class StreamListener:
    """The feeds of every task with local subscribers, over one pub/sub transport.

    Args:
        redis: The shared client (pub/sub takes one connection of its pool, or one per
            cluster shard; fetches use the pool like any command). Not owned.
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
        self._router = PubSubRouter(
            redis,
            on_message=self._on_message,
            on_subscribed=self._on_subscribed,
            heartbeat=heartbeat,
            subscribe_timeout=subscribe_timeout,
        )
        #: Joins' reads (stream tails, backlogs), pipelined: a join storm's connections.
        self.reads = PipelinedReads(redis)
        self._feeds: dict[str, TaskFeed] = {}
        self._by_channel: dict[bytes, TaskFeed] = {}
        self._due: dict[str, TaskFeed] = {}  # feeds with entries to fetch, in wake order
        self._in_flight: set[str] = set()  # feeds whose fetch is on the wire
        self._fetch_due = asyncio.Event()
        self._fetcher: asyncio.Task[None] | None = None
        self._services: dict[bytes, Callable[[Any], None]] = {}  # channels not of a task
        #: Called at each subscription (the control plane starts itself there).
        self.on_use: Callable[[], None] | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        """True while every pub/sub connection is up (False before the first subscriber)."""
        return self._router.connected

    @property
    def reconnects(self) -> int:
        """How many times a pub/sub connection was re-established."""
        return self._router.reconnects

    # -- public --------------------------------------------------------------------------
    def stats(self) -> dict[str, int | bool]:
        """Feeds (tasks), local subscribers, connection state, reconnect count."""
        return {
            "connected": self.connected,
            "tasks": len(self._feeds),
            "subscribers": sum(f.refs for f in self._feeds.values()),
            "reconnects": self.reconnects,
            "connections": self._router.connections,
        }

    async def join(self, task_id: str) -> TaskFeed:
        """Register a local subscriber of ``task_id``; returns once its feed is live."""
        if self._closed:
            raise ListenerClosedError("the listener is closed")
        if self.on_use is not None:
            self.on_use()
        feed = self._feeds.get(task_id)
        if feed is None:
            channel = self._keys.wake(task_id).encode()
            feed = TaskFeed(task_id, self._keys.events(task_id), channel, self._ring_size)
            self._feeds[task_id] = feed
            self._by_channel[channel] = feed
            feed.ready = asyncio.ensure_future(self._start(feed))
        feed.refs += 1
        ready = feed.ready
        assert ready is not None
        if ready.done() and not ready.cancelled() and ready.exception() is None:
            return feed  # a live feed: no wait (a join storm's joins after the first)
        try:
            await asyncio.shield(ready)
        except BaseException:
            await self.leave(feed)
            raise
        return feed

    def feed_of(self, task_id: str) -> TaskFeed:
        """The live feed of ``task_id``: only while a subscriber of the task holds it."""
        return self._feeds[task_id]

    async def serve(self, channel: bytes, handler: Callable[[Any], None]) -> None:
        """Hand every message on ``channel`` (not a task's) to ``handler``.

        On this same transport; returns once the server confirmed the subscription.
        """
        if self._closed:
            raise ListenerClosedError("the listener is closed")
        self._services[channel] = handler
        with redis_errors("subscribe", channel.decode()):
            await self._router.subscribe(channel)

    async def leave(self, feed: TaskFeed) -> None:
        """Unregister a local subscriber; the last one out unsubscribes the channel."""
        feed.refs -= 1
        if feed.refs > 0 or self._feeds.get(feed.task_id) is not feed:
            return
        del self._feeds[feed.task_id]
        self._by_channel.pop(feed.channel, None)
        feed.stop_timer()
        if not self._closed:
            await self._router.unsubscribe(feed.channel)

    async def open(
        self,
        task_id: str,
        start: Callable[[], Awaitable[tuple[list[StreamEntry], Position]]],
        *,
        idle_timeout: float | Callable[[], float | None] | None = None,
    ) -> FeedReader:
        """A reader of a task's stream entries: those ``start`` returns, then every later one.

        The feed is joined before ``start`` runs, so no entry written meanwhile is missed;
        ``start`` returns its entries and the position just before them. The reader hands
        out entries once each, in stream order (de-duplicated by position), from the shared
        ring, or from the stream itself when it has fallen behind the ring; at most
        :data:`SUBSCRIBER_BATCH` at a time, so a reader that stops reading holds no more
        than that (what it has not read stays in the ring or in Redis). See
        :class:`FeedReader` for ``idle_timeout``. Close it with :meth:`FeedReader.close`.
        """
        feed = await self.join(task_id)
        joined = asyncio.get_running_loop().time()
        try:
            with redis_errors("read the task's stream", feed.key):
                pending, position = await start()
        except BaseException:
            await self.leave(feed)
            raise
        return FeedReader(self, feed, pending, position, joined, idle_timeout)

    async def follow(
        self,
        task_id: str,
        start: Callable[[], Awaitable[tuple[list[StreamEntry], Position]]],
        *,
        idle_timeout: float | Callable[[], float | None] | None = None,
    ) -> AsyncGenerator[StreamEntry, None]:
        """Yield what :meth:`open`'s reader hands out.

        Never ends by itself, except when the stream is destroyed (it returns); with
        ``idle_timeout``, raises :class:`OwnerLostError` when the task's owner fell silent
        (see :class:`FeedReader`).
        """
        reader = await self.open(task_id, start, idle_timeout=idle_timeout)
        del start  # nor its closure: a subscriber holds only what it needs
        try:
            while True:
                entry = reader.take()
                if entry is None:
                    if reader.finished:
                        return
                    await reader.more()
                    continue
                yield entry
                del entry  # an idle subscriber must not pin the last event
        finally:
            await reader.close()

    def is_up(self, channel: bytes) -> bool:
        """Whether the pub/sub connection carrying ``channel`` is up."""
        return self._router.is_up(channel)

    async def catch_up(self, key: str, position: Position) -> tuple[list[StreamEntry], Position]:
        """Read entries after ``position`` for a reader behind the ring; wait out outages."""
        attempt = 0
        while True:
            try:
                with redis_errors("catch up with the task's stream", key, connection=False):
                    return await read_entries(
                        self._redis, key, position, check_trim=True, count=SUBSCRIBER_BATCH
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
        await self.reads.aclose()
        await self._router.aclose()

    # -- feed start and fetch ------------------------------------------------------------
    async def _start(self, feed: TaskFeed) -> None:
        """(S)SUBSCRIBE (confirmed by the server), then note the stream's current end."""
        with redis_errors("subscribe", feed.channel.decode()):
            await self._router.subscribe(feed.channel)
        with redis_errors("read the end of the task's stream", feed.key):
            (tail,) = await self.reads.read(("XREVRANGE", feed.key, "+", "-", "COUNT", 1))
            if isinstance(tail, Exception):
                raise tail
        start = parse_entry_id(tail[0][0]) if tail else (0, 0)
        feed.covered_from = start
        feed.last = start
        if feed.dirty:
            self._wake(feed)

    def _wake(self, feed: TaskFeed) -> None:
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

    # -- transport events ------------------------------------------------------------
    def _on_subscribed(self, channel: bytes) -> None:
        """A channel's subscription was confirmed again (reconnect, slot move): backfill."""
        feed = self._by_channel.get(channel)
        if feed is not None and feed.last is not None:
            self._wake(feed)
            # Owners' heartbeats could not reach us meanwhile: a whole lease again.
            feed.alive_at = asyncio.get_running_loop().time()
            feed.notify()

    def _on_message(self, channel: bytes, data: Any) -> None:
        """A wake-up on a feed's channel: an entry it carries, a fetch, or an end."""
        feed = self._by_channel.get(channel)
        if feed is None:
            service = self._services.get(channel)
            if service is not None:
                service(data)
            return
        if data == DESTROYED:
            feed.destroyed = True
            feed.notify()
        elif data == HEARTBEAT:
            feed.alive_at = asyncio.get_running_loop().time()
            feed.notify()
        elif not (isinstance(data, bytes) and self._take_carried(feed, data)):
            self._wake(feed)

    def _take_carried(self, feed: TaskFeed, data: bytes) -> bool:
        """Deliver the entry a wake-up carries, without an XRANGE, when that is safe.

        Only while no fetch for this feed is pending or in flight (then the fetch must go
        first, and this wake-up joins it), and only if the entry follows ``feed.last``
        exactly (``event_log.carried_entry``). False means: fetch instead.
        """
        if feed.last is None or feed.task_id in self._due or feed.task_id in self._in_flight:
            return False
        trusted, entry = carried_entry(feed.key, data, feed.last)
        if entry is not None:
            feed.extend([entry], entry.position)
        return trusted
