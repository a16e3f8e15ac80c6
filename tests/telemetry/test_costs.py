"""What an operation cost, on its span: round trips, retries and conflicts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
from a2a.server.cluster import ConcurrentTaskModificationError, TaskVersion, VersionedEvent
from a2a.types.a2a_pb2 import Message

from a2a_redis.connection.cluster import is_cluster
from a2a_redis.connection.transaction import Batch, Command, WatchedTransaction
from a2a_redis.events.event_stream import RedisTaskEventStream
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from tests.helpers import ctx, make_task
from tests.telemetry.conftest import Otel

MISSING = TaskVersion.MISSING


def costs(otel: Otel, name: str) -> list[tuple[Any, Any, Any]]:
    """(round trips, retries, conflicts) of each finished span ``name``, in order."""
    return [
        (
            (span.attributes or {}).get("a2a_redis.round_trips"),
            (span.attributes or {}).get("a2a_redis.retries"),
            (span.attributes or {}).get("a2a_redis.conflicts"),
        )
        for span in otel.spans(name)
    ]


async def warmed(
    redis: aioredis.Redis,
    prefix: str,
    otel: Otel,
    paired: tuple[VersionedRedisTaskStore, RedisTaskEventStream] | None = None,
) -> VersionedRedisTaskStore:
    """A store whose server has our scripts loaded: the save's, the batch (a delete's) and,
    given a ``paired`` store and stream, the publish's. Else the first use of each loads it:
    +1 or +2 round trips. Warmed on ``task-1``'s keys: on a cluster, on the node the
    test's task lives on."""
    store, stream = paired or (VersionedRedisTaskStore(redis, prefix=prefix), None)
    warm = make_task("task-1")
    version = await store.save(warm, event=warm, prev_version=MISSING, context=ctx())
    if stream is not None:
        reply = Message(message_id="warm", task_id="task-1", context_id="ctx")
        await stream.publish("task-1", VersionedEvent(reply, version))
    await store.delete("task-1", ctx())
    otel.exporter.clear()
    return store


async def test_a_save_is_two_round_trips_and_a_get_one(
    otel: Otel, redis: aioredis.Redis, prefix: str
) -> None:
    store = await warmed(redis, prefix, otel)
    task = make_task("task-1")
    version = await store.save(task, event=task, prev_version=MISSING, context=ctx())
    await store.save(task, prev_version=version, context=ctx())
    assert await store.get("task-1", ctx()) is not None
    with pytest.raises(ConcurrentTaskModificationError):  # read, refused, UNWATCH
        await store.save(task, prev_version=version, context=ctx())
    await store.delete("task-1", ctx())

    index = int(is_cluster(redis))  # on a cluster, the index update after the commit
    saved, refused = (2 + index, 0, 0), (2 + index, 0, 1)
    assert costs(otel, "a2a_redis save") == [saved, saved, refused]
    assert costs(otel, "a2a_redis get") == [(1, 0, 0)]
    assert costs(otel, "a2a_redis delete") == [(2 + index, 0, 0)]


async def test_a_save_that_loses_a_race_counts_its_retry(
    otel: Otel, redis: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer commits between this save's read and its EXEC: the save retries."""
    store = await warmed(redis, prefix, otel)
    other = VersionedRedisTaskStore(redis, prefix=prefix).as_task_store
    task = make_task("task-1")
    await store.save(task, prev_version=MISSING, context=ctx())
    commit = WatchedTransaction.commit
    raced: list[bool] = []

    async def losing(self: WatchedTransaction, commands: Sequence[Command] | Batch) -> Any:
        if not raced:  # (the other writer's own commit goes through)
            raced.append(True)
            await other.save(task, ctx())  # its own span: its round trips are not ours
        return await commit(self, commands)

    monkeypatch.setattr(WatchedTransaction, "commit", losing)
    await store.as_task_store.save(task, ctx())  # an upsert: the retry succeeds

    index = int(is_cluster(redis))  # on a cluster, the index update after the commit
    first, competing, retried = costs(otel, "a2a_redis save")
    assert first == competing == (2 + index, 0, 0)
    assert retried == (4 + index, 1, 0)  # two attempts of two round trips
    stored = await store.get("task-1", ctx())
    assert stored is not None and stored.version == TaskVersion(3)


async def test_a_publish_span_counts_its_round_trip(
    otel: Otel, redis: aioredis.Redis, prefix: str
) -> None:
    store = VersionedRedisTaskStore(redis, prefix=prefix)
    stream = RedisTaskEventStream(redis, task_store=store)
    await warmed(redis, prefix, otel, (store, stream))
    try:
        task = make_task("task-1")
        version = await store.save(task, event=task, prev_version=MISSING, context=ctx())
        await stream.publish("task-1", VersionedEvent(task, version))  # appended by the save
        reply = Message(message_id="m1", task_id="task-1", context_id="ctx")
        await stream.publish("task-1", VersionedEvent(reply, version))
    finally:
        await stream.aclose()
    assert costs(otel, "a2a_redis publish") == [(1, 0, 0)]  # one span: the save's needs none
