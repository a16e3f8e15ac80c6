"""A slow consumer: a subscriber that never reads, beside one that keeps up.

Cluster mode (``RedisTaskEventStream``): the bound is the task stream's retention. A live
subscriber keeps only its position and a turn's worth of entries; the entries it has not
read stay in Redis, in the task's stream, capped by ``StreamRetention.maxlen``. It fails
with ``SubscriberLagError`` when it reads again after the stream was trimmed past its
position; before that, reading late just catches up from the stream. The other
subscribers of the task, which share the replica's feed, are not held back, and the
process's memory does not grow with the events the stalled one missed.

Legacy (``RedisQueueManager``): a remote tap buffers at most ``tap_max_queue_size`` events;
a consumer that leaves it full for the owner's lease is let go: the tap is closed, its
buffered events stay readable, then the queue reports closed (``QueueShutDown``).
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import AsyncGenerator, AsyncIterator

import pytest
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.server.events.event_queue import EventQueueLegacy
from a2a.types.a2a_pb2 import SubscribeToTaskRequest, TaskState

from a2a_redis import RedisBackend, SubscriberLagError
from a2a_redis.events.feed import SUBSCRIBER_BATCH
from a2a_redis.events.queue_manager import RedisQueueManager
from a2a_redis.log.event_log import StreamEntry, StreamRetention
from tests.helpers import (
    agent_card,
    backend_pair,
    connect,
    ctx,
    drain_queue,
    eventually,
    make_task,
    numbered,
    write_numbered,
)

S = TaskState
GUARD = 60.0  # seconds: a hang guard only
MAXLEN = 20  # the stream keeps about this many entries (Redis trims whole nodes of 100)


@pytest.fixture
def maxlen() -> int:
    return MAXLEN


@pytest.fixture
async def pair(
    real_url: str, prefix: str, maxlen: int
) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    retention = StreamRetention(maxlen=maxlen)
    async with backend_pair(real_url, prefix, stream_retention=retention) as replicas:
        yield replicas


class Writer:
    """Replica A's agent: saves and publishes WORKING updates numbered from 0."""

    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend
        self.task = make_task("t", state=S.TASK_STATE_WORKING)
        self.version = TaskVersion.MISSING
        self.written = 0

    async def start(self) -> TaskVersion:
        self.version = await self.backend.task_store.save(
            self.task, event=self.task, prev_version=self.version, context=ctx()
        )
        await self.backend.event_stream.publish("t", VersionedEvent(self.task, self.version))
        return self.version

    async def write(self, count: int) -> None:
        for _ in range(count):
            self.version = await write_numbered(self.backend, self.task, self.version, self.written)
            self.written += 1


async def keep_up(events: AsyncGenerator[VersionedEvent, None], seen: list[int], n: int) -> None:
    async for item in events:
        seen.append(int(item.event.metadata["n"]))  # type: ignore[union-attr]
        if len(seen) == n:
            return


def our_memory() -> int:
    """Bytes currently allocated by a2a-redis code (what a stalled subscriber could pin)."""
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, "*a2a_redis*"), tracemalloc.Filter(True, "*protobuf*")]
    )
    return sum(stat.size for stat in snapshot.statistics("filename"))


async def test_a_subscriber_that_never_reads_fails_late_and_holds_back_no_one(pair):
    a, b = pair
    writer = Writer(a)
    start = await writer.start()
    stalled = b.event_stream.subscribe("t", after=start)
    fast_seen: list[int] = []
    fast = asyncio.create_task(keep_up(b.event_stream.subscribe("t", after=start), fast_seen, 2000))
    reader = asyncio.ensure_future(stalled.__anext__())
    await writer.write(1)
    first = await asyncio.wait_for(reader, GUARD)  # it reads one event, then never again
    assert first.event.metadata["n"] == "0"  # type: ignore[union-attr]

    tracemalloc.start(1)
    try:
        await writer.write(499)
        for _ in range(int(GUARD * 20)):  # bounded: the fast one catches up
            if len(fast_seen) == 500:
                break
            await asyncio.sleep(0.05)
        early = our_memory()
        await writer.write(1500)  # three times as many more
        await asyncio.wait_for(fast, GUARD)
        late = our_memory()
    finally:
        tracemalloc.stop()

    # Not held back: the subscriber that keeps up got every event, once, in order, while
    # the other one stalled (the writer was not slowed either: it wrote them all).
    assert fast_seen == list(range(2000))
    # Memory does not grow with what the stalled subscriber missed (it is in Redis).
    assert late - early < 64 * 1024, (early, late)
    feed = b.listener._feeds["t"]
    assert len(feed.ring) <= feed.ring.maxlen  # type: ignore[operator]
    assert await a.redis.xlen(a.task_store.keys.events("t")) < MAXLEN + 200  # trimmed

    # Reading at last: whatever it still held in hand, in order, then the typed error.
    got = [0]
    with pytest.raises(SubscriberLagError, match="trimmed") as raised:
        for _ in range(1_000):
            item = await asyncio.wait_for(stalled.__anext__(), GUARD)
            got.append(int(item.event.metadata["n"]))  # type: ignore[union-attr]
    assert got == list(range(len(got)))  # no gap before the error
    assert len(got) < 2000
    assert raised.value.key == a.task_store.keys.events("t")  # it names the key
    await stalled.aclose()
    assert b.listener.stats()["subscribers"] == 0


@pytest.mark.parametrize("maxlen", [5_000])
async def test_subscribers_stalled_mid_burst_hold_at_most_one_turn_each(pair):
    """Behind by a burst, a subscriber is handed entries a turn at a time: if it stalls
    there, it holds at most SUBSCRIBER_BATCH entries, not the burst (the rest stays in Redis)."""
    a, b = pair
    writer = Writer(a)
    start = await writer.start()
    keeper_gen = b.event_stream.subscribe("t", after=start)  # keeps the feed (and its ring)

    async def keep_up_and_stay() -> None:
        for _ in range(901):
            await keeper_gen.__anext__()

    keeper = asyncio.create_task(keep_up_and_stay())
    stalled = [b.event_stream.subscribe("t", after=start) for _ in range(5)]
    readers = [asyncio.ensure_future(s.__anext__()) for s in stalled]
    await writer.write(1)
    await asyncio.wait_for(asyncio.gather(*readers), GUARD)
    await writer.write(300)  # a burst while they do not read
    for s in stalled:  # each reads one more (handed the burst, a turn at a time), stalls
        assert (await asyncio.wait_for(s.__anext__(), GUARD)).event.metadata["n"] == "1"  # type: ignore[union-attr]
    await writer.write(600)  # the shared ring moves on past what they were handed
    await asyncio.wait_for(keeper, GUARD)

    def entries() -> int:
        gc.collect()
        return sum(isinstance(o, StreamEntry) for o in gc.get_objects())

    with_them = entries()
    for s in stalled:
        await s.aclose()
    held = with_them - entries()
    assert held <= 5 * SUBSCRIBER_BATCH, held  # (before the turn: about 5 x 300)
    await keeper_gen.aclose()


@pytest.mark.parametrize("maxlen", [5_000])
async def test_a_late_reader_within_the_bound_catches_up_without_error(pair):
    """Behind the shared ring but not past the retention: it reads the rest from Redis."""
    a, b = pair
    writer = Writer(a)
    start = await writer.start()
    late = b.event_stream.subscribe("t", after=start)
    reader = asyncio.ensure_future(late.__anext__())
    await writer.write(1)
    assert (await asyncio.wait_for(reader, GUARD)).event.metadata["n"] == "0"  # type: ignore[union-attr]
    # Stall past the ring, within the stream's retention.
    await writer.write(400)  # more than the ring (256) holds
    got = [
        int((await asyncio.wait_for(late.__anext__(), GUARD)).event.metadata["n"])
        for _ in range(400)
    ]  # type: ignore[union-attr]
    assert got == list(range(1, 401))
    await late.aclose()


async def test_through_the_handler_a_stalled_subscription_raises_subscriber_lag_error(pair):
    """What a client of the SDK's handler gets: SubscribeToTask on B yields the snapshot,
    then, read after the bound was passed, raises SubscriberLagError (through the
    JSON-RPC routes: an error event in the SSE stream)."""
    a, b = pair
    writer = Writer(a)
    await writer.start()
    await writer.write(1)
    handler = b.request_handler(None, agent_card())  # type: ignore[arg-type]
    stream = handler.on_subscribe_to_task(SubscribeToTaskRequest(id="t"), ctx())
    snapshot = await anext(stream)
    assert snapshot.status.state == S.TASK_STATE_WORKING  # type: ignore[union-attr]
    pending = asyncio.ensure_future(anext(stream))
    await writer.write(1)
    await asyncio.wait_for(pending, GUARD)  # live; then it stops reading
    await writer.write(1000)
    with pytest.raises(SubscriberLagError):
        for _ in range(1_000):
            await asyncio.wait_for(anext(stream), GUARD)
    await stream.aclose()


# --- legacy: a remote tap nobody reads ---------------------------------------------------


async def drain(queue: EventQueueLegacy) -> list[int]:
    return [int(event.metadata["n"]) for event in await drain_queue(queue, GUARD)]


async def test_legacy_a_remote_tap_nobody_reads_is_let_go_after_the_lease(
    real_url: str, prefix: str
):
    clients = [connect(real_url) for _ in range(2)]
    # The owner lives throughout: its heartbeats (every lease / 3) keep the fast tap open
    # through any event-loop stall shorter than about 2/3 of the lease.
    lease = 2.0
    a = RedisQueueManager(clients[0], prefix=prefix, lease_ttl=lease)
    b = RedisQueueManager(clients[1], prefix=prefix, lease_ttl=lease, tap_max_queue_size=8)
    try:
        queue = await a.create_or_tap("t")
        stalled = await b.tap("t")
        fast = await b.tap("t")
        assert stalled is not None and fast is not None
        fast_seen = asyncio.create_task(drain(fast))
        for n in range(100):
            await queue.enqueue_event(numbered(n))
        # The stalled tap's pump gives up after a lease with its buffer full.
        await eventually(lambda: b.stats()["taps"] <= 1, what="the stalled tap is let go")
        assert b.stats()["taps"] == 1  # the stalled tap was let go; the fast one goes on
        assert stalled.is_closed()
        assert stalled.queue.qsize() <= 8  # its memory: the bounded buffer only
        owner_seen = asyncio.create_task(drain(queue))  # the owner's own consumer
        await asyncio.wait_for(a.close("t"), GUARD)  # (close waits for it to drain)
        assert await owner_seen == list(range(100))
        assert await asyncio.wait_for(fast_seen, GUARD) == list(range(100))  # not held back
        # The stalled consumer reads at last: its buffer, in order, then "closed".
        assert await drain(stalled) == list(range(8))
        assert b.stats()["taps"] == 0
    finally:
        await b.aclose()
        await a.aclose()
        for client in clients:
            await client.aclose()
