"""RedisQueueManager: the InMemoryQueueManager contract, then what only a shared Redis can do."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from a2a.server.events import InMemoryQueueManager
from a2a.server.events.event_consumer import EventConsumer
from a2a.server.events.event_queue import EventQueueLegacy
from a2a.server.events.queue_manager import NoTaskQueue, QueueManager, TaskQueueExists
from a2a.types.a2a_pb2 import TaskState, TaskStatusUpdateEvent

from a2a_redis.events.queue_manager import RedisQueueManager
from a2a_redis.log.keys import Keys
from tests.helpers import connect, drain_queue, eventually, numbered

GUARD = 60  # seconds: a hang guard only
# An owner's lease in the tests where it must stay alive for a moment (a tap taken, an
# event delivered) and then die: renewed every LEASE / 3, so the owner counts as alive
# through any event-loop stall shorter than about 2/3 of it, even on a loaded machine.
LEASE = 2.0


async def drain(queue: EventQueueLegacy) -> list[TaskStatusUpdateEvent]:
    """Dequeue until the queue is closed and empty."""
    return await drain_queue(queue, GUARD)


async def close_draining(manager: QueueManager, task_id: str, queue: EventQueueLegacy) -> None:
    """Close the owner's queue while its own consumer drains it (close waits for that)."""
    await asyncio.wait_for(asyncio.gather(manager.close(task_id), drain(queue)), GUARD)


@pytest.fixture(params=["in-memory", "redis"])
def manager(request: pytest.FixtureRequest, managers) -> QueueManager:
    return InMemoryQueueManager() if request.param == "in-memory" else managers()


# -- the InMemoryQueueManager contract, both implementations ---------------------------------
async def test_add_then_get(manager: QueueManager):
    queue = EventQueueLegacy()
    await manager.add("t", queue)
    assert await manager.get("t") is queue
    assert await manager.get("other") is None


async def test_add_twice_raises(manager: QueueManager):
    await manager.add("t", EventQueueLegacy())
    with pytest.raises(TaskQueueExists):
        await manager.add("t", EventQueueLegacy())


async def test_tap_receives_later_events(manager: QueueManager):
    queue = EventQueueLegacy()
    await manager.add("t", queue)
    await queue.enqueue_event(numbered(0))
    child = await manager.tap("t")
    assert child is not None
    await queue.enqueue_event(numbered(1))
    await queue.enqueue_event(numbered(2))
    got, _ = await asyncio.gather(drain(child), close_draining(manager, "t", queue))
    assert [e.metadata["n"] for e in got] == ["1", "2"]


async def test_tap_of_unknown_task_is_none(manager: QueueManager):
    assert await manager.tap("nope") is None


async def test_close_removes_and_closes(manager: QueueManager):
    queue = await manager.create_or_tap("t")
    await manager.close("t")
    assert await manager.get("t") is None
    assert queue.is_closed()
    with pytest.raises(NoTaskQueue):
        await manager.close("t")
    with pytest.raises(NoTaskQueue):
        await manager.close("never")


async def test_create_or_tap(manager: QueueManager):
    queue = await manager.create_or_tap("t")
    assert isinstance(queue, EventQueueLegacy)
    assert await manager.get("t") is queue
    child = await manager.create_or_tap("t")
    assert child is not queue
    await queue.enqueue_event(numbered(7))
    assert (await asyncio.wait_for(child.dequeue_event(), GUARD)).metadata["n"] == "7"


async def test_concurrent_adds_and_gets(manager: QueueManager):
    ids = [f"t{i}" for i in range(10)]
    await asyncio.gather(*(manager.add(i, EventQueueLegacy()) for i in ids))
    assert all(q is not None for q in await asyncio.gather(*(manager.get(i) for i in ids)))


# -- across replicas -------------------------------------------------------------------------
async def test_remote_tap_gets_every_later_event_then_closes(managers):
    a, b = managers(), managers()
    assert await b.tap("t") is None  # no replica has it open
    queue = await a.create_or_tap("t")
    await queue.enqueue_event(numbered(0))  # before the tap: not delivered to it
    tap = await b.tap("t")
    assert tap is not None
    for n in range(1, 30):
        await queue.enqueue_event(numbered(n))
    got, _ = await asyncio.gather(drain(tap), close_draining(a, "t", queue))
    assert [int(e.metadata["n"]) for e in got] == list(range(1, 30))
    assert await b.tap("t") is None  # closed everywhere
    assert b.stats()["taps"] == 0


async def test_tap_after_close_is_none_even_when_racing(managers):
    a, b = managers(), managers()
    queue = await a.create_or_tap("t")
    await close_draining(a, "t", queue)
    assert await b.tap("t") is None


async def test_event_consumer_on_a_remote_tap_ends_at_the_final_event(managers):
    a, b = managers(), managers()
    queue = await a.create_or_tap("t")
    tap = await b.tap("t")
    assert tap is not None
    consumer = EventConsumer(tap)

    async def consume() -> list[int]:
        return [e.status.state async for e in consumer.consume_all()]  # type: ignore[union-attr]

    reader = asyncio.create_task(consume())
    await queue.enqueue_event(numbered(1))
    await queue.enqueue_event(numbered(2, state=TaskState.TASK_STATE_COMPLETED))
    states = await asyncio.wait_for(reader, GUARD)
    assert states == [TaskState.TASK_STATE_WORKING, TaskState.TASK_STATE_COMPLETED]
    await close_draining(a, "t", queue)


async def test_immediate_close_by_the_consumer_loses_nothing_for_remote_taps(managers):
    """EventConsumer closes the owner's queue with immediate=True at the final event."""
    a, b = managers(), managers()
    queue = await a.create_or_tap("t")
    tap = await b.tap("t")
    assert tap is not None
    for n in range(20):
        await queue.enqueue_event(numbered(n))
    await queue.close(immediate=True)
    assert [int(e.metadata["n"]) for e in await drain(tap)] == list(range(20))


async def test_owner_death_ends_remote_taps(real_url: str, real_redis, prefix: str):
    """The owner stops renewing (a crash): taps close after about lease_ttl, never hang."""
    owner_client = connect(real_url)
    tap_client = connect(real_url)
    a = RedisQueueManager(owner_client, prefix=prefix, lease_ttl=LEASE)
    b = RedisQueueManager(tap_client, prefix=prefix, lease_ttl=LEASE)
    try:
        queue = await a.create_or_tap("t")
        tap = await b.tap("t")
        assert tap is not None
        await queue.enqueue_event(numbered(1))
        got = await asyncio.wait_for(tap.dequeue_event(), GUARD)  # delivered while A lives
        tap.task_done()
        assert got.metadata["n"] == "1"  # type: ignore[union-attr]
        # The owner "dies": its lease is no longer renewed, no heartbeat, no close mark.
        assert a.leases.drop("t") is not None
        assert await drain(tap) == []  # then the tap ends: no heartbeat for a lease
        assert tap.is_closed()
        lease = Keys(prefix).lease("t")
        await eventually(lambda: _gone(real_redis, lease), what="the lease expires")
        assert await b.tap("t") is None
    finally:
        await b.aclose()
        await a.aclose()
        await owner_client.aclose()
        await tap_client.aclose()


async def _gone(redis: aioredis.Redis, key: str) -> bool:
    return not await redis.exists(key)


async def test_aclose_releases_leases_and_ends_taps(managers):
    a, b = managers(), managers()
    await a.create_or_tap("t")
    tap = await b.tap("t")
    assert tap is not None
    await a.aclose()
    assert await drain(tap) == []
    assert await b.tap("t") is None


async def test_fifty_tasks_each_with_a_remote_tap(managers):
    a, b = managers(), managers()
    queues = [await a.create_or_tap(f"t{i}") for i in range(50)]
    taps = [await b.tap(f"t{i}") for i in range(50)]

    async def produce(i: int) -> None:
        for n in range(10):
            await queues[i].enqueue_event(numbered(n))
        await close_draining(a, f"t{i}", queues[i])

    results = await asyncio.gather(*(drain(t) for t in taps if t), *(produce(i) for i in range(50)))
    for got in results[:50]:
        assert [int(e.metadata["n"]) for e in got] == list(range(10))
    assert b.stats() == {"queues": 0, "leases": 0, "taps": 0}
    assert a.stats() == {"queues": 0, "leases": 0, "taps": 0}


async def test_add_refuses_a_queue_it_cannot_mirror(managers):
    with pytest.raises(TypeError, match="EventQueueLegacy"):
        await managers().add("t", object())  # type: ignore[arg-type]


# -- regressions found in review -------------------------------------------------------------
async def test_a_reopened_queue_is_tapped_past_the_previous_close_mark(managers):
    a, b = managers(), managers()
    first = await a.create_or_tap("t")
    await close_draining(a, "t", first)  # run 1 ends: a close mark now ends the stream
    second = await a.create_or_tap("t")  # a follow-up reopens the queue
    tap = await b.tap("t")
    assert tap is not None
    await second.enqueue_event(numbered(1))
    got, _ = await asyncio.gather(drain(tap), close_draining(a, "t", second))
    assert [e.metadata["n"] for e in got] == ["1"]


async def test_an_abandoned_remote_tap_does_not_leak(managers):
    a, b = managers(), managers()
    queue = await a.create_or_tap("t")
    tap = await b.tap("t")
    assert tap is not None  # ... and nobody ever reads it
    for n in range(5):
        await queue.enqueue_event(numbered(n))
    await close_draining(a, "t", queue)
    await eventually(lambda: b.stats()["taps"] == 0, what="the pump lets go at the close mark")
    assert tap.is_closed()


async def test_a_lease_lost_in_an_outage_is_taken_again(managers, redis, prefix):
    a, b = managers(lease_ttl=0.3), managers(lease_ttl=0.3)
    await a.create_or_tap("t")
    await redis.delete(Keys(prefix).lease("t"))  # as if it expired while Redis was away
    # A's next renewal (every 0.1 s) takes it again: a tap finds the queue once more.
    tap = await eventually(lambda: b.tap("t"), what="the lease is taken again")
    await tap.close(immediate=True)


async def test_a_tap_waits_as_long_as_the_owners_lease_not_its_own(managers, redis, prefix):
    """B's tap gives up after the owner's lease (its token says 0.4 s), not after B's own.

    The owner dies before B taps, and the test keeps its lease in Redis (as if B came
    within the lease): B's lookup cannot depend on A's renewals keeping up on a loaded
    machine, where a 0.4 s lease can lapse between two of them.
    """
    a, b = managers(lease_ttl=0.4), managers(lease_ttl=3600)  # B's own setting: an hour
    await a.create_or_tap("t")
    token = a.leases.drop("t")  # the owner dies: no renewal, no heartbeat, no close mark
    assert token is not None
    lease = Keys(prefix).lease("t")
    await redis.set(lease, token)  # its lease, not yet lapsed (no expiry)
    tap = await b.tap("t")
    assert tap is not None
    # B ends the tap after A's 0.4 s of silence; with its own hour it would hang (GUARD).
    assert await drain(tap) == []
    await eventually(lambda: b.stats()["taps"] == 0, what="B lets the tap go")
