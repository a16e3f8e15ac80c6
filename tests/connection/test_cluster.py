"""Redis Cluster behaviour the contract suites cannot show: slot moves, cross-slot indexes.

The contract suites already run on the session's 3-primary cluster (the ``cluster``
backend). These tests start their own cluster, because they move slots around.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.types.a2a_pb2 import ListTasksRequest, TaskState
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from a2a_redis import RedisBackend, VersionedRedisTaskStore
from a2a_redis.log.codec import index_member
from a2a_redis.log.keys import Keys
from a2a_redis.ops.embedded import EmbeddedCluster, EmbeddedServer, call
from a2a_redis.stores import task_index
from tests.helpers import (
    Follow,
    backend_pair,
    connect,
    ctx,
    eventually,
    make_task,
    numbered,
    start_task,
    write_numbered,
)

GUARD = 60  # seconds: a hang guard only
S = TaskState


@pytest.fixture
def cluster() -> Iterator[EmbeddedCluster]:
    """A private cluster, for tests that move slots."""
    with EmbeddedCluster() as c:
        yield c


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[EmbeddedCluster]:
    """A cluster for this module's tests that leave the slots where they are."""
    with EmbeddedCluster() as c:
        yield c


@pytest.fixture
async def cluster_client(shared_cluster: EmbeddedCluster) -> AsyncIterator[RedisCluster]:
    client = connect(shared_cluster.url)
    yield client  # type: ignore[misc]
    await client.aclose()


def _slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


def _node_id(server: EmbeddedServer) -> str:
    return str(call(server.port, "CLUSTER", "MYID")).strip()


def move_slot(cluster: EmbeddedCluster, slot: int, target: EmbeddedServer) -> int:
    """Reshard one slot to ``target`` as redis-cli does: IMPORTING/MIGRATING, MIGRATE, NODE."""
    source = cluster.node_for_slot(slot)
    source_id, target_id = _node_id(source), _node_id(target)
    call(target.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
    call(source.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
    moved = 0
    while True:
        keys = call(source.port, "CLUSTER", "GETKEYSINSLOT", str(slot), "100")
        if not keys:
            break
        call(source.port, "MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *keys)
        moved += len(keys)
    for server in (target, source, *[p for p in cluster.primaries if p not in (source, target)]):
        call(server.port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
    return moved


async def test_resharding_a_live_task_loses_and_duplicates_nothing(
    cluster: EmbeddedCluster, prefix: str
):
    """Move the slot of a streaming task to another primary mid-stream (MIGRATE)."""
    async with backend_pair(cluster.url, prefix) as (writer, reader):
        task, version = await start_task(writer.task_store)
        total = 120
        subscription = reader.event_stream.subscribe("t", after=version)
        follower = Follow(subscription, last=total - 1, guard=GUARD)
        while not reader.listener.connected:
            await asyncio.sleep(0.01)
        slot = _slot_of(writer.task_store.keys.task("t"))
        source = cluster.node_for_slot(slot)
        target = next(p for p in cluster.primaries if p is not source)
        moved = 0
        for n in range(total):
            version = await write_numbered(writer, task, version, n)
            if n == total // 2:  # the task's record, stream and push keys move now
                moved = await asyncio.to_thread(move_slot, cluster, slot, target)
        assert await follower.ended() is None
        assert moved >= 2  # the record and the stream (at least) really moved
        assert cluster.node_for_slot(slot) is target
        assert follower.ns == list(range(total))  # every event once, in order
        stored = await reader.task_store.get("t", ctx())
        assert stored is not None and stored.version == TaskVersion(total + 1)
        page = await reader.task_store.list(ListTasksRequest(), ctx())
        assert [t.id for t in page.tasks] == ["t"]


async def test_indexes_across_slots_are_repaired_on_read(
    cluster_client: RedisCluster, prefix: str, monkeypatch: pytest.MonkeyPatch
):
    """A writer that died between its commit and its index update, and stale entries."""
    real_redis = cluster_client
    store = VersionedRedisTaskStore(real_redis, prefix=prefix)
    keys = Keys(prefix)
    assert _slot_of(keys.task("t1")) != _slot_of(keys.index("alice"))  # really cross-slot
    v = await store.save(make_task("t1"), prev_version=TaskVersion.MISSING, context=ctx())

    # 1. The writer of t1's next state dies after EXEC, before its index update.
    async def die(*_args: object) -> None:
        raise asyncio.CancelledError  # nothing after the commit runs

    monkeypatch.setattr(store._records.index, "finish", die)
    done = make_task("t1", state=S.TASK_STATE_COMPLETED)
    done.status.timestamp.FromSeconds(2_000_000_000)
    with pytest.raises(asyncio.CancelledError):
        await store.save(done, prev_version=v, context=ctx())
    monkeypatch.undo()
    assert await real_redis.zcard(keys.pending("alice")) == 1  # the mark outlived its writer
    # Until the mark is due, a list shows no stale state: the old entry is dropped and
    # repaired; the task is missing from its new state's index (the crash window).
    completed = ListTasksRequest(status=S.TASK_STATE_COMPLETED)
    working_ = ListTasksRequest(status=S.TASK_STATE_SUBMITTED)
    assert [t.id for t in (await store.list(working_, ctx())).tasks] == []
    assert await real_redis.zcard(keys.index("alice", state=S.TASK_STATE_SUBMITTED)) == 0
    # Once due, a list reconciles the task from its hash: it is listed in its new state.
    monkeypatch.setattr(task_index, "PENDING_GRACE_MS", 0)
    page = await store.list(completed, ctx())
    assert [(t.id, t.status.state) for t in page.tasks] == [("t1", S.TASK_STATE_COMPLETED)]
    assert await real_redis.zcard(keys.pending("alice")) == 0
    assert [t.id for t in (await store.list(ListTasksRequest(), ctx())).tasks] == ["t1"]

    # 2. Entries that no longer match a record: another owner's, or a deleted task's.
    await real_redis.zadd(keys.index("alice"), {index_member(make_task("t-bob")): 0})
    await store.save(make_task("t-bob"), prev_version=TaskVersion.MISSING, context=ctx("bob"))
    await store.save(make_task("t2"), prev_version=TaskVersion.MISSING, context=ctx())
    await real_redis.unlink(keys.task("t2"))  # as if deleted, index update lost
    page = await store.list(ListTasksRequest(), ctx())
    assert [t.id for t in page.tasks] == ["t1"]
    assert page.total_size == 1  # repaired: the stale entries are gone from the index
    assert await real_redis.zcard(keys.index("alice")) == 1


async def test_a_users_own_redis_cluster_client_works(shared_cluster: EmbeddedCluster, prefix: str):
    """A plain ``redis.asyncio.cluster.RedisCluster`` the user made and owns."""
    client = RedisCluster(host="127.0.0.1", port=shared_cluster.primaries[0].port)
    await client.initialize()
    try:
        async with RedisBackend(client, prefix=prefix) as backend:
            task = make_task("t", state=S.TASK_STATE_WORKING)
            v = await backend.task_store.save(
                task, event=task, prev_version=TaskVersion.MISSING, context=ctx()
            )
            got = []

            async def follow() -> None:
                async for item in backend.event_stream.subscribe("t", after=TaskVersion.MISSING):
                    got.append(item.version)
                    if len(got) == 2:
                        return

            follower = asyncio.create_task(follow())
            event = numbered(1, "t")
            v = await backend.task_store.save(task, event=event, prev_version=v, context=ctx())
            await backend.event_stream.publish("t", VersionedEvent(event, v))
            await asyncio.wait_for(follower, GUARD)
            assert got == [TaskVersion(1), TaskVersion(2)]
            await backend.control.ready()  # its control channel: a link on its own shard
            keys = backend.task_store.keys
            channels = (keys.wake("t"), keys.control(backend.leases.replica))
            shards = {shared_cluster.node_for_slot(_slot_of(c)).port for c in channels}
            assert backend.listener.stats()["connections"] == len(shards)  # a link per shard
        assert await client.ping()  # not closed by the backend
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        for key in keys:
            await client.unlink(key)
        await client.aclose()


def test_cluster_url_forms():
    from a2a_redis.connection.cluster import cluster_client

    client = cluster_client("rediss+cluster://user:p%40ss@h1:7000,h2:7001,[::1]:7002")
    seeds = [(n.host, n.port) for n in client.nodes_manager.startup_nodes.values()]
    assert ("h1", 7000) in seeds and ("h2", 7001) in seeds and ("::1", 7002) in seeds
    kwargs = client.nodes_manager.connection_kwargs
    assert kwargs["username"] == "user" and kwargs["password"] == "p@ss"
    with pytest.raises(ValueError, match="one database"):
        cluster_client("redis+cluster://h1:7000/3")
    assert connect  # the helper builds cluster clients for test URLs


async def test_one_pubsub_connection_per_shard_not_per_task(
    shared_cluster: EmbeddedCluster, prefix: str
):
    """30 followed tasks spread over the 3 primaries: 3 pub/sub connections, SSUBSCRIBEd.

    (One more shard channel: the replica's control channel, on the same links.)
    """
    async with RedisBackend.from_url(shared_cluster.url, prefix=prefix) as backend:
        ids = [f"task-{i}" for i in range(30)]
        owners = {
            shared_cluster.node_for_slot(_slot_of(backend.task_store.keys.task(t))).port
            for t in ids
        }
        assert len(owners) == 3  # the ids really spread over every shard

        async def follow(task_id: str) -> None:
            async for _ in backend.event_stream.subscribe(task_id, after=TaskVersion.MISSING):
                return

        followers = [asyncio.create_task(follow(t)) for t in ids]

        def subscribed() -> int:  # shard channels the primaries have confirmed, in all
            return sum(
                len(call(p.port, "PUBSUB", "SHARDCHANNELS", f"{prefix}:*"))
                for p in shared_cluster.primaries
            )

        try:
            await eventually(
                lambda: subscribed() == 31 and backend.listener.connected, interval=0.05
            )
            stats = backend.listener.stats()
            assert stats["tasks"] == 30 and stats["connections"] == 3
            for primary in shared_cluster.primaries:  # shard channels, each on its own shard
                channels = call(primary.port, "PUBSUB", "SHARDCHANNELS", f"{prefix}:*")
                assert channels and all(
                    shared_cluster.node_for_slot(_slot_of(c)) is primary for c in channels
                )
                assert call(primary.port, "PUBSUB", "CHANNELS", f"{prefix}:*") == []
        finally:
            for follower in followers:
                follower.cancel()
            await asyncio.gather(*followers, return_exceptions=True)
