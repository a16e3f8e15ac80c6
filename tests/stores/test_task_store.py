"""Contract tests of VersionedRedisTaskStore and RedisTaskStore, on real servers and fakeredis."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from a2a.server.cluster import ConcurrentTaskModificationError, TaskVersion
from a2a.types.a2a_pb2 import (
    Artifact,
    ListTasksRequest,
    Part,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatusUpdateEvent,
)

from a2a_redis.errors import TaskOwnedElsewhereError
from a2a_redis.log.codec import decode_event
from a2a_redis.log.event_log import StreamRetention
from a2a_redis.stores.task_store import RedisTaskStore, VersionedRedisTaskStore
from tests.helpers import ctx, make_task

S = TaskState
MISSING = TaskVersion.MISSING


@pytest.fixture
def store(redis: aioredis.Redis, prefix: str) -> VersionedRedisTaskStore:
    return VersionedRedisTaskStore(redis, prefix=prefix)


def status_event(task_id: str, state: int, context_id: str = "ctx") -> TaskStatusUpdateEvent:
    event = TaskStatusUpdateEvent(task_id=task_id, context_id=context_id)
    event.status.state = state
    return event


async def test_first_write_is_version_1_and_each_write_adds_1(store: VersionedRedisTaskStore):
    task = make_task("t1")
    v1 = await store.save(task, prev_version=MISSING, context=ctx())
    assert v1 == TaskVersion(1)
    task.status.state = S.TASK_STATE_WORKING
    v2 = await store.save(task, prev_version=v1, context=ctx())
    assert v2 == TaskVersion(2)
    assert v2.is_after(v1)
    stored = await store.get("t1", ctx())
    assert stored is not None
    assert stored.task == task
    assert stored.version == v2


async def test_get_missing_is_none(store: VersionedRedisTaskStore):
    assert await store.get("nope", ctx()) is None


async def test_first_write_over_existing_task_conflicts(store: VersionedRedisTaskStore):
    await store.save(make_task("t1"), prev_version=MISSING, context=ctx())
    with pytest.raises(ConcurrentTaskModificationError):
        await store.save(make_task("t1"), prev_version=MISSING, context=ctx())


async def test_stale_version_conflicts_and_leaves_task_unchanged(store: VersionedRedisTaskStore):
    task = make_task("t1")
    v1 = await store.save(task, prev_version=MISSING, context=ctx())
    task.status.state = S.TASK_STATE_WORKING
    await store.save(task, prev_version=v1, context=ctx())
    task.status.state = S.TASK_STATE_COMPLETED
    with pytest.raises(ConcurrentTaskModificationError):
        await store.save(task, prev_version=v1, context=ctx())
    stored = await store.get("t1", ctx())
    assert stored is not None
    assert stored.task.status.state == S.TASK_STATE_WORKING
    assert stored.version == TaskVersion(2)


async def test_update_of_absent_task_conflicts(store: VersionedRedisTaskStore):
    with pytest.raises(ConcurrentTaskModificationError):
        await store.save(make_task("t1"), prev_version=TaskVersion(3), context=ctx())


async def test_foreign_version_type_conflicts(store: VersionedRedisTaskStore):
    await store.save(make_task("t1"), prev_version=MISSING, context=ctx())
    with pytest.raises(ConcurrentTaskModificationError):
        await store.save(make_task("t1"), prev_version=TaskVersion("1"), context=ctx())


async def test_cancel_skips_version_check_on_non_terminal(store: VersionedRedisTaskStore):
    task = make_task("t1")
    v1 = await store.save(task, prev_version=MISSING, context=ctx())
    task.status.state = S.TASK_STATE_WORKING
    await store.save(task, prev_version=v1, context=ctx())
    cancelled = make_task("t1", state=S.TASK_STATE_CANCELED)
    v3 = await store.save(cancelled, prev_version=v1, context=ctx())  # stale, still accepted
    assert v3 == TaskVersion(3)
    stored = await store.get("t1", ctx())
    assert stored is not None
    assert stored.task.status.state == S.TASK_STATE_CANCELED


@pytest.mark.parametrize(
    "state",
    [S.TASK_STATE_COMPLETED, S.TASK_STATE_FAILED, S.TASK_STATE_REJECTED, S.TASK_STATE_CANCELED],
)
async def test_cancel_of_terminal_task_conflicts(store: VersionedRedisTaskStore, state: int):
    v0 = await store.save(make_task("t1"), prev_version=MISSING, context=ctx())
    v1 = await store.save(make_task("t1", state=state), prev_version=v0, context=ctx())
    with pytest.raises(ConcurrentTaskModificationError):
        await store.save(
            make_task("t1", state=S.TASK_STATE_CANCELED), prev_version=v1, context=ctx()
        )


async def test_cancel_of_absent_task_conflicts(store: VersionedRedisTaskStore):
    with pytest.raises(ConcurrentTaskModificationError):
        await store.save(
            make_task("t1", state=S.TASK_STATE_CANCELED), prev_version=MISSING, context=ctx()
        )


async def test_event_is_appended_with_its_version(
    store: VersionedRedisTaskStore, redis: aioredis.Redis
):
    task = make_task("t1")
    v1 = await store.save(task, event=task, prev_version=MISSING, context=ctx())
    task.status.state = S.TASK_STATE_WORKING
    e2 = status_event("t1", S.TASK_STATE_WORKING)
    v2 = await store.save(task, event=e2, prev_version=v1, context=ctx())
    e3 = TaskArtifactUpdateEvent(
        task_id="t1", context_id="ctx", artifact=Artifact(artifact_id="a", parts=[Part(text="x")])
    )
    task.artifacts.append(e3.artifact)
    v3 = await store.save(task, event=e3, prev_version=v2, context=ctx())
    await store.save(task, event=None, prev_version=v3, context=ctx())  # a direct write
    key = store.keys.events("t1")
    entries = await redis.xrange(key)
    decoded = [decode_event(key, fields) for _, fields in entries]
    assert [v for v, _ in decoded] == [1, 2, 3]
    assert [e for _, e in decoded] == [make_task("t1"), e2, e3]


async def test_a_conflicting_write_appends_no_event(
    store: VersionedRedisTaskStore, redis: aioredis.Redis
):
    task = make_task("t1")
    await store.save(task, event=task, prev_version=MISSING, context=ctx())
    with pytest.raises(ConcurrentTaskModificationError):
        await store.save(task, event=task, prev_version=MISSING, context=ctx())
    assert await redis.xlen(store.keys.events("t1")) == 1


async def test_delete_removes_record_stream_and_index_entries(
    store: VersionedRedisTaskStore, redis: aioredis.Redis, prefix: str
):
    task = make_task("t1", context_id="c", state=S.TASK_STATE_WORKING, ts_ns=5)
    await store.save(task, event=task, prev_version=MISSING, context=ctx())
    await store.save(make_task("t2"), prev_version=MISSING, context=ctx())
    await store.delete("t1", ctx())
    assert await store.get("t1", ctx()) is None
    page = await store.list(ListTasksRequest(), ctx())
    assert [t.id for t in page.tasks] == ["t2"]
    assert page.total_size == 1
    await store.delete("t2", ctx())
    assert [k async for k in redis.scan_iter(match=f"{prefix}:*")] == []
    await store.delete("t2", ctx())  # deleting again is a no-op


async def test_owner_scoping(store: VersionedRedisTaskStore):
    v1 = await store.save(make_task("t1"), prev_version=MISSING, context=ctx("alice"))
    assert await store.get("t1", ctx("bob")) is None
    assert await store.get("t1", ctx("")) is None
    assert (await store.list(ListTasksRequest(), ctx("bob"))).total_size == 0
    await store.delete("t1", ctx("bob"))
    assert await store.get("t1", ctx("alice")) is not None
    # bob can neither create over it nor update it, whatever version he claims
    for prev in (MISSING, v1):
        with pytest.raises(ConcurrentTaskModificationError):
            await store.save(make_task("t1"), prev_version=prev, context=ctx("bob"))
    with pytest.raises(ConcurrentTaskModificationError):
        await store.save(
            make_task("t1", state=S.TASK_STATE_CANCELED), prev_version=v1, context=ctx("bob")
        )
    stored = await store.get("t1", ctx("alice"))
    assert stored is not None
    assert stored.version == v1
    assert stored.task.status.state == S.TASK_STATE_SUBMITTED


async def test_plain_store_shares_records_with_versioned_store(
    store: VersionedRedisTaskStore, redis: aioredis.Redis, prefix: str
):
    plain = RedisTaskStore(redis, prefix=prefix)
    assert isinstance(store.as_task_store, RedisTaskStore)
    await plain.save(make_task("t1"), ctx())
    stored = await store.get("t1", ctx())
    assert stored is not None
    assert stored.version == TaskVersion(1)
    await plain.save(make_task("t1", state=S.TASK_STATE_WORKING), ctx())
    stored = await store.get("t1", ctx())
    assert stored is not None
    assert stored.version == TaskVersion(2)
    assert (await store.as_task_store.get("t1", ctx())) == stored.task
    assert [t.id for t in (await plain.list(ListTasksRequest(), ctx())).tasks] == ["t1"]
    with pytest.raises(TaskOwnedElsewhereError) as err:
        await plain.save(make_task("t1"), ctx("mallory"))
    assert store.keys.task("t1") in str(err.value)
    await plain.delete("t1", ctx("mallory"))
    assert await plain.get("t1", ctx()) is not None
    await plain.delete("t1", ctx())
    assert await store.get("t1", ctx()) is None


async def test_list_follows_state_and_context_changes(store: VersionedRedisTaskStore):
    task = make_task("t1", context_id="a", ts_ns=10)
    v = await store.save(task, prev_version=MISSING, context=ctx())
    task.status.state = S.TASK_STATE_WORKING
    task.status.timestamp.FromNanoseconds(20)
    await store.save(task, prev_version=v, context=ctx())

    async def ids(**kw: object) -> list[str]:
        return [t.id for t in (await store.list(ListTasksRequest(**kw), ctx())).tasks]

    assert await ids(status=S.TASK_STATE_SUBMITTED) == []
    assert await ids(status=S.TASK_STATE_WORKING) == ["t1"]
    assert await ids(context_id="a", status=S.TASK_STATE_WORKING) == ["t1"]
    assert await ids(context_id="a", status=S.TASK_STATE_SUBMITTED) == []
    assert await ids(context_id="b") == []


async def test_terminal_ttl_expires_task_and_purges_its_index_entries(
    redis: aioredis.Redis, prefix: str
):
    store = VersionedRedisTaskStore(redis, prefix=prefix, terminal_ttl=0.2)
    v = await store.save(make_task("done"), prev_version=MISSING, context=ctx())
    await store.save(make_task("keep"), prev_version=MISSING, context=ctx())
    assert await redis.pttl(store.keys.task("done")) == -1  # not terminal yet: kept
    await store.save(make_task("done", state=S.TASK_STATE_COMPLETED), prev_version=v, context=ctx())
    ttl = await redis.pttl(store.keys.task("done"))
    assert 0 < ttl <= 200 or ttl == -2  # expiring within 0.2 s (or gone already: a slow machine)
    assert await redis.zcard(store.keys.expiring("alice")) == 1
    assert await redis.pttl(store.keys.task("keep")) == -1
    for _ in range(200):  # wait (bounded) for the server to expire the record
        if not await redis.exists(store.keys.task("done")):
            break
        await asyncio.sleep(0.02)
    page = await store.list(ListTasksRequest(), ctx())
    assert [t.id for t in page.tasks] == ["keep"]
    assert page.total_size == 1
    assert await redis.zcard(store.keys.expiring("alice")) == 0
    assert await redis.zcard(store.keys.index("alice", state=S.TASK_STATE_COMPLETED)) == 0


async def test_event_stream_is_capped_and_gets_a_ttl(redis: aioredis.Redis, prefix: str):
    retention = StreamRetention(maxlen=10, terminal_ttl=60, idle_ttl=600)
    store = VersionedRedisTaskStore(redis, prefix=prefix, stream_retention=retention)
    task = make_task("t1", state=S.TASK_STATE_WORKING)
    version = MISSING
    for _ in range(500):
        version = await store.save(
            task, event=status_event("t1", S.TASK_STATE_WORKING), prev_version=version,
            context=ctx(),
        )  # fmt: skip
    events = store.keys.events("t1")
    assert await redis.xlen(events) < 500  # MAXLEN ~ trims whole nodes, so not exactly 10
    assert 600_000 // 2 < await redis.pttl(events) <= 600_000  # the idle TTL, not the terminal
    task.status.state = S.TASK_STATE_COMPLETED
    await store.save(task, event=task, prev_version=version, context=ctx())
    assert 0 < await redis.pttl(events) <= 60_000


async def test_client_with_decoded_responses_is_refused():
    client = aioredis.Redis(decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        VersionedRedisTaskStore(client)
    await client.aclose()


def test_bad_settings_are_refused():
    client = aioredis.Redis()
    with pytest.raises(ValueError, match="prefix"):
        VersionedRedisTaskStore(client, prefix="a{b}")
    with pytest.raises(ValueError, match="terminal_ttl"):
        VersionedRedisTaskStore(client, terminal_ttl=0)
    with pytest.raises(ValueError, match="retention"):
        StreamRetention(maxlen=0)
