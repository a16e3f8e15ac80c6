"""Corrupt data, wrong key types, hostile ids and outages: typed errors, nothing else harmed."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from a2a.server.cluster import ConcurrentTaskModificationError, TaskVersion
from a2a.types.a2a_pb2 import ListTasksRequest, TaskState
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from a2a_redis.errors import (
    A2ARedisError,
    CorruptDataError,
    PoolExhaustedError,
    RedisUnavailableError,
    UnsupportedSchemaError,
)
from a2a_redis.log.keys import Keys, encode_id
from a2a_redis.ops.embedded import EmbeddedServer
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from tests.helpers import connect, ctx, make_task, on_every_node

MISSING = TaskVersion.MISSING

HOSTILE_IDS = [
    "{t:x}",
    "}{",
    "a:b",
    "a%3Ab",
    "*",
    "?",
    "[a-z]",
    "\\",
    "with space",
    "ünïcødé-✓-🙂",
    "nul\x00byte",
    "cr\r\nlf",
    "%",
    "x" * 1024,  # the longest id (keys.MAX_ID_BYTES)
]


@pytest.fixture
def store(redis: aioredis.Redis, prefix: str) -> VersionedRedisTaskStore:
    return VersionedRedisTaskStore(redis, prefix=prefix)


def test_encode_id_is_injective_and_tag_safe():
    encoded = [encode_id(i) for i in HOSTILE_IDS]
    assert len(set(encoded)) == len(HOSTILE_IDS)
    for e in encoded:
        assert not set(e) & set("{}:*?[]\\ \x00\r\n")
    assert encode_id("550e8400-e29b-41d4-a716-446655440000") == (
        "550e8400-e29b-41d4-a716-446655440000"
    )
    assert encode_id("\ud800") != encode_id("\ud801")  # lone surrogates too


def test_every_key_of_a_task_shares_one_hash_tag():
    keys = Keys("p")
    for task_id in HOSTILE_IDS:
        tags = {
            k[k.index("{") : k.index("}") + 1]
            for k in (keys.task(task_id), keys.events(task_id), keys.wake(task_id))
        }
        assert len(tags) == 1  # fmt: skip
        for k in (keys.task(task_id), keys.events(task_id)):
            assert k.startswith("p:{") and k.count("{") == 1 and k.count("}") == 1


async def test_hostile_ids_round_trip_without_collision(
    store: VersionedRedisTaskStore, redis: aioredis.Redis, prefix: str
):
    for i, task_id in enumerate(HOSTILE_IDS):
        owner = HOSTILE_IDS[-1 - i]
        task = make_task(task_id, context_id=HOSTILE_IDS[i - 1], ts_ns=i)
        await store.save(task, event=task, prev_version=MISSING, context=ctx(owner))
    for i, task_id in enumerate(HOSTILE_IDS):
        owner = HOSTILE_IDS[-1 - i]
        stored = await store.get(task_id, ctx(owner))
        assert stored is not None
        assert stored.task.id == task_id
        page = await store.list(ListTasksRequest(context_id=HOSTILE_IDS[i - 1]), ctx(owner))
        assert [t.id for t in page.tasks] == [task_id]
    async for key in redis.scan_iter(match="*"):
        if key.startswith(b"test:"):
            continue
        assert not key.startswith(prefix.encode()), key  # pragma: no cover
    for i, task_id in enumerate(HOSTILE_IDS):
        await store.delete(task_id, ctx(HOSTILE_IDS[-1 - i]))
    assert [k async for k in redis.scan_iter(match=f"{prefix}:*")] == []


async def _healthy_neighbour(store: VersionedRedisTaskStore) -> None:
    await store.save(make_task("fine"), prev_version=MISSING, context=ctx())


async def _assert_neighbour_unharmed(store: VersionedRedisTaskStore) -> None:
    stored = await store.get("fine", ctx())
    assert stored is not None
    assert stored.version == TaskVersion(1)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        (b"d", b"\xff\xff\xff\xff", CorruptDataError),  # truncated / garbage protobuf
        (b"d", make_task("other").SerializeToString(), CorruptDataError),  # foreign record
        (b"v", b"seven", CorruptDataError),
        (b"f", b"99", UnsupportedSchemaError),
        (b"f", b"x", CorruptDataError),
    ],
)
async def test_corrupt_record_raises_typed_error_naming_the_key(
    store: VersionedRedisTaskStore, redis: aioredis.Redis, field: bytes, value: bytes, error: type
):
    await _healthy_neighbour(store)
    await store.save(make_task("bad"), prev_version=MISSING, context=ctx())
    await redis.hset(store.keys.task("bad"), field, value)
    with pytest.raises(error) as info:
        await store.get("bad", ctx())
    assert info.value.key == store.keys.task("bad")
    assert store.keys.task("bad") in str(info.value)
    if field != b"d":  # the head is read by writers too
        with pytest.raises(error):
            await store.save(make_task("bad"), prev_version=TaskVersion(1), context=ctx())
    await _assert_neighbour_unharmed(store)


async def test_corrupt_record_in_a_list_page_raises_typed_error(
    store: VersionedRedisTaskStore, redis: aioredis.Redis
):
    await store.save(make_task("bad"), prev_version=MISSING, context=ctx())
    await redis.hset(store.keys.task("bad"), b"d", b"\x08")
    with pytest.raises(CorruptDataError, match="bad"):
        await store.list(ListTasksRequest(), ctx())
    assert (await store.list(ListTasksRequest(), ctx("other"))).total_size == 0


async def test_wrong_key_type_raises_typed_error(
    store: VersionedRedisTaskStore, redis: aioredis.Redis
):
    await _healthy_neighbour(store)
    await redis.set(store.keys.task("str"), b"not a hash")
    with pytest.raises(CorruptDataError) as info:
        await store.get("str", ctx())
    assert info.value.key == store.keys.task("str")
    with pytest.raises(CorruptDataError):
        await store.save(make_task("str"), prev_version=MISSING, context=ctx())
    with pytest.raises(CorruptDataError):
        await store.delete("str", ctx())
    await redis.set(store.keys.index("alice"), b"not a zset")
    with pytest.raises(CorruptDataError):
        await store.list(ListTasksRequest(), ctx())
    await _assert_neighbour_unharmed(store)


async def test_outage_is_an_error_never_not_found(prefix: str):
    """Stop a private server: every call raises RedisUnavailableError; a restart heals."""
    with EmbeddedServer() as server:
        client = connect(server.url, retry=Retry(NoBackoff(), 1), socket_connect_timeout=1)
        store = VersionedRedisTaskStore(client, prefix=prefix, max_attempts=2)
        v = await store.save(make_task("t"), prev_version=MISSING, context=ctx())
        server.kill()
        calls = [
            store.get("t", ctx()),
            store.save(make_task("t"), prev_version=v, context=ctx()),
            store.list(ListTasksRequest(), ctx()),
            store.delete("t", ctx()),
            store.as_task_store.get("t", ctx()),
        ]
        for call in calls:
            with pytest.raises(RedisUnavailableError) as info:
                await call
            assert isinstance(info.value, A2ARedisError)
        server.start()  # no persistence: the server comes back empty
        assert await store.get("t", ctx()) is None
        await store.save(make_task("t"), prev_version=MISSING, context=ctx())
        assert (await store.list(ListTasksRequest(), ctx())).total_size == 1
        await client.aclose()


async def test_invalid_state_number_is_stored_and_listed(store: VersionedRedisTaskStore):
    """Protobuf keeps unknown enum numbers; the store must neither crash nor lose them."""
    task = make_task("t", state=TaskState.TASK_STATE_WORKING)
    task.status.state = 42  # type: ignore[assignment]
    await store.save(task, prev_version=MISSING, context=ctx())
    page = await store.list(ListTasksRequest(status=42), ctx())  # type: ignore[arg-type]
    assert [t.id for t in page.tasks] == ["t"]


async def test_pool_exhaustion_is_its_own_error_not_an_outage(real_url: str, prefix: str):
    # A cluster client made by a2a-redis waits for a turn (pool_timeout); a plain pool fails.
    waits = {"pool_timeout": 0.001} if real_url.startswith("redis+cluster") else {}
    client = connect(real_url, max_connections=2, **waits)
    store = VersionedRedisTaskStore(client, prefix=prefix)
    for i in range(4):
        await store.save(make_task(f"t{i}"), prev_version=MISSING, context=ctx())
    results = await asyncio.gather(
        *(store.get(f"t{i % 4}", ctx()) for i in range(40)), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors, "40 concurrent gets on 2 connections should exhaust the pool"
    assert all(isinstance(e, PoolExhaustedError) for e in errors)
    assert not any(isinstance(e, RedisUnavailableError) for e in errors)
    saves = await asyncio.gather(
        *(store.save(make_task(f"n{i}"), prev_version=MISSING, context=ctx()) for i in range(40)),
        return_exceptions=True,
    )
    assert {type(r) for r in saves} <= {TaskVersion, PoolExhaustedError}
    await client.aclose()
    cleanup = connect(real_url)
    async for key in cleanup.scan_iter(match=f"{prefix}:*"):
        await cleanup.unlink(key)
    await cleanup.aclose()


async def test_conflicts_keep_their_pooled_connections(real_url: str, prefix: str):
    client = connect(real_url)
    store = VersionedRedisTaskStore(client, prefix=prefix)
    await store.save(make_task("t"), prev_version=MISSING, context=ctx())
    with pytest.raises(ConcurrentTaskModificationError):  # warm: every connection it needs
        await store.save(make_task("t"), prev_version=MISSING, context=ctx())

    async def accepted() -> list[int]:  # connections each server has accepted so far
        replies = await on_every_node(client, "INFO", "stats")
        infos = replies.values() if isinstance(client, RedisCluster) else [replies]
        return [int(i["total_connections_received"]) for i in infos]

    before = await accepted()
    for _ in range(20):
        with pytest.raises(ConcurrentTaskModificationError):
            await store.save(make_task("t"), prev_version=MISSING, context=ctx())
    assert await accepted() == before  # no connection was discarded and reopened
    await client.aclose()


async def test_a_blocking_pool_that_runs_dry_is_pool_exhaustion(real_url: str, prefix: str):
    if real_url.startswith("redis+cluster"):  # the cluster client's gate plays the pool
        client = connect(real_url, max_connections=1, pool_timeout=0.05)
        await client.initialize()
        await client.permits.acquire()  # another request holds the only permit
        release = client.permits.release
    else:
        pool = aioredis.BlockingConnectionPool.from_url(real_url, max_connections=1, timeout=0.05)
        client = aioredis.Redis.from_pool(pool)
        held = await pool.get_connection()  # another request holds the only connection

        async def release() -> None:
            await pool.release(held)

    store = VersionedRedisTaskStore(client, prefix=prefix, max_attempts=2)
    for call in (
        store.save(make_task("t"), prev_version=MISSING, context=ctx()),
        store.get("t", ctx()),
        store.list(ListTasksRequest(), ctx()),
    ):
        with pytest.raises(PoolExhaustedError):
            await call
    if (released := release()) is not None:
        await released
    assert await store.get("t", ctx()) is None  # and all is well once it is back
    await client.aclose()
    cleanup = connect(real_url)
    async for key in cleanup.scan_iter(match=f"{prefix}:*"):
        await cleanup.unlink(key)
    await cleanup.aclose()


async def test_a_bad_expiry_entry_neither_fails_a_save_nor_blocks_the_owner(
    redis: aioredis.Redis, prefix: str
):
    store = VersionedRedisTaskStore(redis, prefix=prefix, terminal_ttl=60)
    await redis.zadd(store.keys.expiring("alice"), {b"\xc1garbage": 1})  # due, undecodable
    v = await store.save(make_task("t"), prev_version=MISSING, context=ctx())
    done = make_task("t", state=TaskState.TASK_STATE_COMPLETED)
    assert await store.save(done, prev_version=v, context=ctx()) == TaskVersion(2)
    assert (await store.list(ListTasksRequest(), ctx())).total_size == 1
    assert await redis.zscore(store.keys.expiring("alice"), b"\xc1garbage") is None
    assert await redis.pttl(store.keys.push_configs("t")) in (-2, -1)  # none stored yet
    await redis.hset(store.keys.push_configs("t"), b"x", b"y")
    done.status.timestamp.FromNanoseconds(5)
    await store.save(done, prev_version=TaskVersion(2), context=ctx())
    assert 0 < await redis.pttl(store.keys.push_configs("t")) <= 60_000  # expires with its task
