"""Contract and fault tests of RedisTaskEventStream: two "replicas" (clients) per test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.types.a2a_pb2 import Message, TaskState, TaskStatusUpdateEvent

from a2a_redis.events.event_stream import RedisTaskEventStream
from a2a_redis.events.listener import StreamListener
from a2a_redis.log.event_log import StreamRetention
from a2a_redis.log.keys import Keys
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from tests.helpers import connect, ctx, eventually, make_task, on_every_node, subscriber_count

S = TaskState
MISSING = TaskVersion.MISSING
GUARD = 20  # seconds: a hang guard only, never an asserted bound


class Replica:
    def __init__(self, client: aioredis.Redis, prefix: str, **stream_kwargs: object) -> None:
        self.client = client
        self.store = VersionedRedisTaskStore(client, prefix=prefix)
        self.stream = RedisTaskEventStream(client, task_store=self.store, **stream_kwargs)  # type: ignore[arg-type]

    async def close(self) -> None:
        await self.stream.aclose()
        await self.client.aclose()  # for replicas made outside client_factory


@pytest.fixture
async def pair(redis: aioredis.Redis, client_factory, prefix: str) -> AsyncIterator[tuple]:
    a, b = Replica(client_factory(), prefix), Replica(client_factory(), prefix)
    yield a, b
    await a.stream.aclose()
    await b.stream.aclose()


async def produce(replica: Replica, task_id: str, states: list[int]) -> list[TaskVersion]:
    """Save + publish a task's life on ``replica`` (as the SDK's executing replica does)."""
    task = make_task(task_id)
    version = await replica.store.save(task, event=task, prev_version=MISSING, context=ctx())
    await replica.stream.publish(task_id, VersionedEvent(task, version))
    versions = [version]
    for state in states:
        event = TaskStatusUpdateEvent(task_id=task_id, context_id="ctx")
        event.status.state = state
        task.status.state = state
        version = await replica.store.save(task, event=event, prev_version=version, context=ctx())
        await replica.stream.publish(task_id, VersionedEvent(event, version))
        versions.append(version)
    return versions


async def collect(
    stream: RedisTaskEventStream,
    task_id: str,
    after: TaskVersion,
    n: int,
    out: list[VersionedEvent] | None = None,
):
    """The first ``n`` events of a subscription (kept in ``out`` as they come, if given)."""
    out = [] if out is None else out
    gen = stream.subscribe(task_id, after=after)
    try:
        async for item in gen:
            out.append(item)
            if len(out) == n:
                break
    finally:
        await gen.aclose()
    return out


async def test_replay_then_live_in_order_exactly_once(pair):
    a, b = pair
    versions = await produce(a, "t", [S.TASK_STATE_WORKING] * 3)
    seen: list[VersionedEvent] = []
    reader = asyncio.create_task(collect(b.stream, "t", versions[1], 2 + 5, seen))
    await eventually(lambda: len(seen) == 2 or reader.done())  # replayed: now it follows live
    task = make_task("t", state=S.TASK_STATE_WORKING)
    version = versions[-1]
    for state in [S.TASK_STATE_WORKING] * 4 + [S.TASK_STATE_COMPLETED]:
        event = TaskStatusUpdateEvent(task_id="t", context_id="ctx")
        event.status.state = state
        task.status.state = state
        version = await a.store.save(task, event=event, prev_version=version, context=ctx())
        await a.stream.publish("t", VersionedEvent(event, version))
        versions.append(version)
    got = await asyncio.wait_for(reader, GUARD)
    assert [g.version for g in got] == versions[2:]
    assert got[-1].event.status.state == S.TASK_STATE_COMPLETED


async def test_publish_of_a_stored_event_appends_nothing(pair):
    a, _ = pair
    await produce(a, "t", [S.TASK_STATE_WORKING])
    assert await a.client.xlen(a.store.keys.events("t")) == 2


async def test_message_reply_is_appended_by_publish(pair):
    a, b = pair
    versions = await produce(a, "t", [])
    reply = Message(message_id="m1", task_id="t", context_id="ctx")
    await a.stream.publish("t", VersionedEvent(reply, versions[-1]))
    got = await asyncio.wait_for(collect(b.stream, "t", MISSING, 2), GUARD)
    assert [type(g.event).__name__ for g in got] == ["Task", "Message"]
    assert got[1].event == reply


async def test_stream_without_our_store_appends_and_dedupes(redis: aioredis.Redis, prefix: str):
    """Paired with another store, publish appends; a duplicate publish is delivered once."""
    stream = RedisTaskEventStream(redis, prefix=prefix)
    events = []
    for v in (1, 2, 3):
        event = TaskStatusUpdateEvent(task_id="t", context_id="ctx")
        event.status.state = S.TASK_STATE_WORKING
        events.append(VersionedEvent(event, TaskVersion(v)))
    for e in [events[0], events[1], events[1], events[2]]:
        await stream.publish("t", e)
    got = await asyncio.wait_for(collect(stream, "t", MISSING, 3), GUARD)
    assert [g.version for g in got] == [TaskVersion(1), TaskVersion(2), TaskVersion(3)]
    await stream.aclose()


async def test_many_subscribers_share_one_connection_and_one_fetch(pair):
    a, b = pair
    await produce(a, "t", [])
    readers = [asyncio.create_task(collect(b.stream, "t", TaskVersion(1), 3)) for _ in range(50)]
    await eventually(
        lambda: b.stream.listener.stats()["subscribers"] == 50 and b.stream.listener.connected
    )
    assert b.stream.listener.stats() == {
        "connected": True, "tasks": 1, "subscribers": 50, "reconnects": 0, "connections": 1,
    }  # fmt: skip
    task = make_task("t")
    version = TaskVersion(1)
    for state in (S.TASK_STATE_WORKING, S.TASK_STATE_WORKING, S.TASK_STATE_COMPLETED):
        event = TaskStatusUpdateEvent(task_id="t", context_id="ctx")
        event.status.state = state
        version = await a.store.save(task, event=event, prev_version=version, context=ctx())
        await a.stream.publish("t", VersionedEvent(event, version))
    results = await asyncio.wait_for(asyncio.gather(*readers), GUARD)
    for got in results:
        assert [g.version for g in got] == [TaskVersion(2), TaskVersion(3), TaskVersion(4)]
    assert b.stream.listener.stats()["subscribers"] == 0  # closing released everything
    assert b.stream.listener.stats()["tasks"] == 0


async def test_slow_subscriber_catches_up_from_the_stream(redis, backend, prefix, pair):
    """A subscriber behind the shared ring reads from the stream: complete, memory bounded."""
    a, _ = pair
    listener = StreamListener(a.client, a.store.keys, ring_size=4)
    stream = RedisTaskEventStream(a.client, task_store=a.store, listener=listener)
    await produce(a, "t", [])
    gen = stream.subscribe("t", after=TaskVersion(1))
    first = asyncio.create_task(gen.__anext__())
    versions = await produce_more(a, "t", TaskVersion(1), 1)
    got = [await asyncio.wait_for(first, GUARD)]  # it has read its backlog: it follows live
    versions += await produce_more(a, "t", versions[-1], 40)  # ten rings' worth
    while len(got) < 41:
        got.append(await asyncio.wait_for(gen.__anext__(), GUARD))
    await gen.aclose()
    assert [g.version for g in got] == versions
    assert listener.stats()["tasks"] == 0
    await listener.aclose()


async def test_subscribers_cancelled_while_waiting_leave_nothing_on_the_feed(pair):
    """A waiting subscriber holds one future on its task's feed; one cancelled while
    waiting (a client gone) takes it away as it leaves, while the task stays idle."""
    a, b = pair
    versions = await produce(a, "t", [S.TASK_STATE_INPUT_REQUIRED])
    keeper = b.stream.subscribe("t", after=versions[-1])
    kept = asyncio.ensure_future(keeper.__anext__())  # waits for the next event
    await eventually(lambda: b.stream.listener.stats()["subscribers"] == 1)
    feed = b.stream.listener.feed_of("t")
    for _ in range(20):
        gen = b.stream.subscribe("t", after=versions[-1])
        waiting = asyncio.ensure_future(gen.__anext__())
        await eventually(lambda: len(feed.waiters) == 2)  # the keeper and this one
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await eventually(lambda: feed.refs == 1)
        assert len(feed.waiters) == 1  # the keeper's
    more = await produce_more(a, "t", versions[-1], 1)
    assert (await asyncio.wait_for(kept, GUARD)).version == more[0]
    await keeper.aclose()


async def produce_more(replica: Replica, task_id: str, version: TaskVersion, n: int):
    task = make_task(task_id, state=S.TASK_STATE_WORKING)
    out = []
    for _ in range(n):
        event = TaskStatusUpdateEvent(task_id=task_id, context_id="ctx")
        event.status.state = S.TASK_STATE_WORKING
        version = await replica.store.save(task, event=event, prev_version=version, context=ctx())
        await replica.stream.publish(task_id, VersionedEvent(event, version))
        out.append(version)
    return out


async def test_destroy_and_delete_end_subscribers_cleanly(pair):
    a, b = pair
    await produce(a, "t1", [])
    await produce(a, "t2", [])
    r1 = asyncio.create_task(collect(b.stream, "t1", TaskVersion(1), 99))
    r2 = asyncio.create_task(collect(b.stream, "t2", TaskVersion(1), 99))
    for task_id in ("t1", "t2"):  # both subscribed on the server: the end will reach them
        channel = a.store.keys.wake(task_id)
        await eventually(lambda: subscriber_count(a.client, channel))  # noqa: B023
    await a.stream.destroy("t1")
    await a.store.delete("t2", ctx())
    assert await asyncio.wait_for(r1, GUARD) == []
    assert await asyncio.wait_for(r2, GUARD) == []
    assert await a.client.exists(a.store.keys.events("t1")) == 0


async def test_terminal_publish_shortens_stream_ttl(redis: aioredis.Redis, prefix: str):
    stream = RedisTaskEventStream(
        redis, prefix=prefix, stream_retention=StreamRetention(terminal_ttl=30, idle_ttl=900)
    )
    event = TaskStatusUpdateEvent(task_id="t", context_id="ctx")
    event.status.state = S.TASK_STATE_WORKING
    await stream.publish("t", VersionedEvent(event, TaskVersion(1)))
    assert await redis.pttl(Keys(prefix).events("t")) > 30_000
    event.status.state = S.TASK_STATE_COMPLETED
    await stream.publish("t", VersionedEvent(event, TaskVersion(2)))
    assert 0 < await redis.pttl(Keys(prefix).events("t")) <= 30_000
    await stream.aclose()


async def test_pubsub_connection_killed_mid_stream_loses_nothing(real_redis, real_url, prefix):
    """CLIENT KILL TYPE pubsub: the listener reconnects, re-subscribes, backfills."""
    a = Replica(connect(real_url), prefix)
    b = Replica(connect(real_url), prefix)
    try:
        await produce(a, "t", [])
        reader = asyncio.create_task(collect(b.stream, "t", TaskVersion(1), 30))
        # B's pub/sub connection is subscribed: the first kill below really hits it.
        await eventually(lambda: subscriber_count(real_redis, a.store.keys.wake("t")))
        version = TaskVersion(1)
        versions = []
        for i in range(3):
            versions += await produce_more(a, "t", version, 5)
            version = versions[-1]
            await on_every_node(real_redis, "CLIENT", "KILL", "TYPE", "pubsub")
            versions += await produce_more(a, "t", version, 5)  # written while reconnecting
            version = versions[-1]
            del i
        got = await asyncio.wait_for(reader, GUARD)
        assert [g.version for g in got] == versions
        assert b.stream.listener.stats()["reconnects"] >= 1
    finally:
        await a.close()
        await b.close()


async def test_subscriber_behind_a_trimmed_stream_gets_subscriber_lag_error(
    real_redis: aioredis.Redis, prefix: str
):
    """Trimmed (MAXLEN) past its position, a slow subscriber fails loudly, never skips."""
    from a2a_redis.errors import SubscriberLagError

    store = VersionedRedisTaskStore(
        real_redis, prefix=prefix, stream_retention=StreamRetention(maxlen=10)
    )
    listener = StreamListener(real_redis, store.keys, ring_size=4)
    stream = RedisTaskEventStream(real_redis, task_store=store, listener=listener)
    task = make_task("t")
    version = await store.save(task, event=task, prev_version=MISSING, context=ctx())
    gen = stream.subscribe("t", after=MISSING)
    first = await asyncio.wait_for(gen.__anext__(), GUARD)  # then it stops reading
    assert first.version == version
    task.status.state = S.TASK_STATE_WORKING
    for _ in range(1_000):  # far more than maxlen: whole stream nodes are trimmed
        version = await store.save(
            task, event=status_event_for(task), prev_version=version, context=ctx()
        )
    with pytest.raises(SubscriberLagError, match="trimmed"):
        for _ in range(1_000):
            await asyncio.wait_for(gen.__anext__(), GUARD)
    await gen.aclose()
    await stream.aclose()
    await listener.aclose()


def status_event_for(task) -> TaskStatusUpdateEvent:
    event = TaskStatusUpdateEvent(task_id=task.id, context_id=task.context_id)
    event.status.state = task.status.state
    return event


async def test_a_resp2_replica_without_hiredis_follows_live_events(
    real_url: str, prefix: str
) -> None:
    """redis-py 8 speaks RESP3 by default; a user may choose ``protocol=2``, where redis-py's
    pure-Python RESP2 parser takes no pub/sub push handler (``a2a_redis.connection.compat``)."""
    from redis._parsers import _AsyncRESP2Parser

    resp2: dict[str, object] = {"protocol": 2}
    if "cluster" not in real_url:  # RedisCluster takes no parser_class: hiredis parses there
        resp2["parser_class"] = _AsyncRESP2Parser
    a = Replica(connect(real_url), prefix)
    b = Replica(connect(real_url, **resp2), prefix)
    try:
        versions = await produce(a, "t", [])
        reader = asyncio.create_task(collect(b.stream, "t", versions[-1], 2))

        async def subscribed() -> None:
            while not await subscriber_count(a.client, b.store.keys.wake("t")):
                await asyncio.sleep(0.01)

        await asyncio.wait_for(subscribed(), GUARD)
        task = make_task("t", state=S.TASK_STATE_WORKING)
        version = versions[-1]
        for state in (S.TASK_STATE_WORKING, S.TASK_STATE_COMPLETED):
            event = TaskStatusUpdateEvent(task_id="t", context_id="ctx")
            event.status.state = state
            task.status.state = state
            version = await a.store.save(task, event=event, prev_version=version, context=ctx())
            await a.stream.publish("t", VersionedEvent(event, version))
        got = await asyncio.wait_for(reader, GUARD)
        assert [item.event.status.state for item in got] == [
            S.TASK_STATE_WORKING,
            S.TASK_STATE_COMPLETED,
        ]
    finally:
        await a.close()
        await b.close()
