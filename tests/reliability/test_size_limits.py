"""Oversized ids and payloads meet their documented limits; hostile ids cannot forge logs.

* An id over ``keys.MAX_ID_BYTES`` (1,024 UTF-8 bytes), up to 1 MiB, is refused with
  ``InvalidIdError`` by every call that would build a key from it, naming the key with the
  id elided, and nothing is written.
* A payload (Task, event, push config) over ``max_payload_bytes`` (default 8 MiB) is
  refused with ``PayloadTooLargeError`` naming the key, with its size and the limit,
  before anything is written; exactly at the limit it is accepted.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.server.events.event_queue import QueueShutDown
from a2a.types.a2a_pb2 import (
    ListTasksRequest,
    Message,
    Part,
    Role,
    Task,
    TaskPushNotificationConfig,
    TaskStatusUpdateEvent,
)

from a2a_redis import (
    InvalidIdError,
    PayloadTooLargeError,
    RedisPushNotificationConfigStore,
    RedisQueueManager,
    RedisTaskEventStream,
    VersionedRedisTaskStore,
)
from a2a_redis.log.codec import MAX_PAYLOAD_BYTES
from a2a_redis.log.keys import Keys
from tests.helpers import ctx, make_task
from tests.reliability.test_hostile_input import GUARD, MIB, MISSING, Components, first_event, scan


# -- 1 MiB ids and payloads ----------------------------------------------------------------------
async def test_a_one_mib_id_is_refused_everywhere_and_writes_nothing(
    redis: aioredis.Redis, prefix: str
) -> None:
    huge = "{" + "x" * MIB + "}"
    c = Components(redis, prefix)
    try:
        calls = [
            c.store.save(make_task(huge), prev_version=MISSING, context=ctx()),
            c.store.save(make_task("t", context_id=huge), prev_version=MISSING, context=ctx()),
            c.store.save(make_task("t"), prev_version=MISSING, context=ctx(huge)),
            c.store.as_task_store.save(make_task(huge), ctx()),
            c.store.get(huge, ctx()),
            c.store.delete(huge, ctx()),
            c.store.list(ListTasksRequest(), ctx(huge)),
            c.store.list(ListTasksRequest(context_id=huge), ctx()),
            c.stream.publish(huge, VersionedEvent(TaskStatusUpdateEvent(), TaskVersion(1))),
            first_event(c, huge, MISSING),
            c.owner_qm.create_or_tap(huge),
            c.remote_qm.tap(huge),
            c.push.set_info(huge, TaskPushNotificationConfig(url="https://x"), ctx()),
            c.push.set_info("t", TaskPushNotificationConfig(id=huge, url="https://x"), ctx()),
            c.push.set_info("t", TaskPushNotificationConfig(url="https://x"), ctx(huge)),
            c.push.get_info(huge, ctx()),
            c.push.get_info_for_dispatch(huge),
            c.push.delete_info("t", ctx(), huge),
        ]
        for call in calls:
            with pytest.raises(InvalidIdError) as info:
                await call
            assert info.value.key is not None and info.value.key.startswith(prefix + ":{")
            assert "x" * 64 not in str(info.value)  # the id is elided, never echoed
        for call in (c.store.get("t", ctx(huge)), c.store.delete("t", ctx(huge))):
            with pytest.raises(InvalidIdError):
                await call
        assert await scan(redis, Keys(prefix).scan_pattern()) == set()
        assert c.owner_qm.stats() == {"queues": 0, "leases": 0, "taps": 0}
    finally:
        await c.aclose()


def padded(task: Task, size: int) -> Task:
    """``task`` with metadata padding that makes it exactly ``size`` bytes encoded."""
    task.metadata["pad"] = ""
    while task.ByteSize() < size:
        task.metadata["pad"] += "x" * max(1, (size - task.ByteSize()) // 2)
    assert task.ByteSize() == size
    return task


def big_message(size: int) -> Message:
    return Message(message_id="m", role=Role.ROLE_AGENT, parts=[Part(text="x" * size)])


async def test_payloads_over_the_limit_are_refused_naming_the_key_and_write_nothing(
    redis: aioredis.Redis, prefix: str
) -> None:
    limit = 4096
    store = VersionedRedisTaskStore(redis, prefix=prefix, max_payload_bytes=limit)
    stream = RedisTaskEventStream(redis, task_store=store)
    qm = RedisQueueManager(redis, prefix=prefix, max_payload_bytes=limit)
    push = RedisPushNotificationConfigStore(redis, prefix=prefix, max_payload_bytes=limit)
    keys = store.keys
    try:
        fits = padded(make_task("t"), limit)  # exactly at the limit: accepted
        v = await store.save(fits, event=None, prev_version=MISSING, context=ctx())
        over = make_task("t")
        over.CopyFrom(fits)
        over.metadata["pad"] += "x"
        with pytest.raises(PayloadTooLargeError) as info:
            await store.save(over, prev_version=v, context=ctx())
        assert (info.value.key, info.value.size, info.value.limit) == (
            keys.task("t"),
            limit + 1,
            limit,
        )
        # An event over the limit: the whole save is refused, the record stays as it was.
        with pytest.raises(PayloadTooLargeError) as info:
            await store.save(fits, event=big_message(limit), prev_version=v, context=ctx())
        assert info.value.key == keys.events("t")
        stored = await store.get("t", ctx())
        assert stored is not None and stored.version == v
        assert await redis.exists(keys.events("t")) == 0
        with pytest.raises(PayloadTooLargeError) as info:
            await stream.publish("t", VersionedEvent(big_message(limit), v))
        assert info.value.key == keys.events("t")
        # The legacy queue: the producer's enqueue raises; no remote tap sees it.
        queue = await qm.create_or_tap("q")
        with pytest.raises(PayloadTooLargeError) as info:
            await queue.enqueue_event(big_message(limit))
        assert info.value.key == keys.events("q")
        assert await redis.xlen(keys.events("q")) == 0
        assert await queue.dequeue_event() == big_message(limit)  # local delivery happened
        queue.task_done()
        await asyncio.wait_for(qm.close("q"), GUARD)
        config = TaskPushNotificationConfig(url="https://x/" + "x" * limit)
        with pytest.raises(PayloadTooLargeError) as info:
            await push.set_info("t", config, ctx())
        assert info.value.key == keys.push_configs("t")
        assert await push.get_info("t", ctx()) == []
        assert isinstance(info.value, ValueError)
    finally:
        await stream.aclose()
        await qm.aclose()


async def test_the_default_limit_is_8_mib(redis: aioredis.Redis, prefix: str) -> None:
    assert MAX_PAYLOAD_BYTES == 8 * MIB
    store = VersionedRedisTaskStore(redis, prefix=prefix)
    task = make_task("t")
    task.metadata["pad"] = "x" * MAX_PAYLOAD_BYTES
    with pytest.raises(PayloadTooLargeError) as info:
        await store.save(task, prev_version=MISSING, context=ctx())
    assert info.value.limit == MAX_PAYLOAD_BYTES and info.value.key == store.keys.task("t")
    assert await scan(redis, Keys(prefix).scan_pattern()) == set()
    with pytest.raises(ValueError, match="max_payload_bytes"):
        VersionedRedisTaskStore(redis, prefix=prefix, max_payload_bytes=0)


async def test_hostile_ids_in_logs_are_quoted(
    redis: aioredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A CR/LF in an id cannot forge a log line: ids are logged with repr()."""
    caplog.set_level("WARNING", logger="a2a_redis")
    evil = "t\nWARNING forged line\r"
    owner_qm = RedisQueueManager(redis, prefix=prefix, lease_ttl=0.3)
    remote_qm = RedisQueueManager(redis, prefix=prefix)
    try:
        await owner_qm.create_or_tap(evil)
        # The owner goes silent, as if it died: no renewal, no heartbeat ...
        token = owner_qm.leases.drop(evil)
        assert token is not None
        # ... and its lease has not lapsed yet when the tap looks it up (kept by the test:
        # a 0.3 s lease could lapse between two renewals on a loaded machine).
        await redis.set(Keys(prefix).lease(evil), token)
        tap = await remote_qm.tap(evil)
        assert tap is not None
        with pytest.raises(QueueShutDown):
            await asyncio.wait_for(tap.dequeue_event(), GUARD)
    finally:
        await remote_qm.aclose()
        await owner_qm.aclose()
    messages = [r.getMessage() for r in caplog.records]
    assert any("went silent" in m for m in messages), messages
    assert not any("\n" in m or "\r" in m for m in messages), messages
