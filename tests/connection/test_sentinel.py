"""Redis Sentinel: the URL, the master client, WAIT durability, and doctor's view.

Runs against a local deployment (a primary, a replica, three Sentinels) started from the
embedded server binary; failover itself is in tests/reliability/test_sentinel_failover.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.server.events.event_queue import EventQueueLegacy
from a2a.types.a2a_pb2 import (
    ListTasksRequest,
    Message,
    Part,
    Role,
    TaskPushNotificationConfig,
    TaskState,
)
from redis.asyncio.sentinel import Sentinel

from a2a_redis import (
    Durability,
    RedisBackend,
    RedisUnavailableError,
    ReplicationTimeoutError,
)
from a2a_redis.connection.sentinel import (
    SentinelBlockingConnectionPool,
    is_sentinel_url,
    parse_sentinel_url,
)
from a2a_redis.connection.transaction import WatchedTransaction
from a2a_redis.log.codec import F_VERSION, encode_event
from a2a_redis.log.keys import Keys
from a2a_redis.ops.cli import main as cli
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from tests.deployments import SERVICE, SentinelDeployment
from tests.helpers import ctx, free_port, make_task, numbered

GUARD = 30  # seconds: a hang guard only
WORKING = TaskState.TASK_STATE_WORKING


# -- the URL -------------------------------------------------------------------------------
def test_url_names_the_sentinels_the_service_and_the_data_node_options():
    parsed = parse_sentinel_url(
        "redis+sentinel://app:p%40ss@s1:26380,s2,[::1]:26381/my%20master/3"
        "?socket_timeout=2.5&sentinel_password=sp&min_other_sentinels=1&health_check_interval=7"
    )
    assert parsed.sentinels == [("s1", 26380), ("s2", 26379), ("::1", 26381)]
    assert parsed.service_name == "my master"
    assert parsed.tls is False
    assert parsed.connection_kwargs == {
        "db": 3,
        "username": "app",
        "password": "p@ss",
        "socket_timeout": 2.5,
        "health_check_interval": 7,
    }
    assert parsed.sentinel_kwargs == {"password": "sp"}
    assert parsed.min_other_sentinels == 1


def test_tls_url_uses_tls_to_the_data_nodes_and_to_the_sentinels():
    parsed = parse_sentinel_url("rediss+sentinel://:pw@s1/svc?ssl_cert_reqs=none")
    assert parsed.tls
    assert parsed.connection_kwargs == {"password": "pw", "ssl": True, "ssl_cert_reqs": "none"}
    assert parsed.sentinel_kwargs == {"ssl": True, "ssl_cert_reqs": "none"}


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://s1:26379",  # no service
        "redis+sentinel://s1:26379/",  # no service
        "redis+sentinel://s1:26379/svc/0/extra",
        "redis+sentinel://s1:port/svc",
        "redis+sentinel:///svc",  # no Sentinel
        "redis+sentinel://s1/svc/zero",
        "redis+sentinel://s1/svc?socket_timeout=soon",
        "redis://s1/svc",
    ],
)
def test_malformed_urls_are_refused(url: str):
    with pytest.raises(ValueError):
        parse_sentinel_url(url)
    if is_sentinel_url(url):
        with pytest.raises(ValueError):
            RedisBackend.from_url(url)


def test_the_password_never_appears_in_a_url_error():
    with pytest.raises(ValueError) as e:
        parse_sentinel_url("redis+sentinel://:s3cret@s1:26379")
    assert "s3cret" not in str(e.value)


def test_from_url_builds_a_blocking_sentinel_pool_with_the_pool_options():
    backend = RedisBackend.from_url(
        "redis+sentinel://127.0.0.1:1,127.0.0.1:2/svc/2?socket_connect_timeout=0.5",
        max_connections=9,
        pool_timeout=4,
        socket_timeout=6,
        retries=2,
    )
    pool = backend.redis.connection_pool
    assert isinstance(pool, SentinelBlockingConnectionPool)
    assert (pool.service_name, pool.max_connections, pool.timeout) == ("svc", 9, 4)
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (2, 6, 0.5)
    assert kwargs["retry"].get_retries() == 2
    assert len(pool.sentinel_manager.sentinels) == 2


async def test_no_sentinel_answering_is_an_outage_never_not_found(prefix: str):
    dead = ",".join(f"127.0.0.1:{free_port()}" for _ in range(3))
    async with RedisBackend.from_url(
        f"redis+sentinel://{dead}/svc", prefix=prefix, socket_connect_timeout=0.5
    ) as backend:
        with pytest.raises(RedisUnavailableError) as e:
            await backend.task_store.get("t", ctx())
        assert e.value.key == Keys(prefix).task("t")
        with pytest.raises(RedisUnavailableError):
            await backend.ping()


# -- a live deployment ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def deployment() -> Iterator[SentinelDeployment]:
    # A long down-after: these tests stop the replica for a moment, never the master.
    with SentinelDeployment(down_after_ms=5000) as running:
        yield running


@pytest.fixture
async def admin(deployment: SentinelDeployment, prefix: str) -> aioredis.Redis:
    """A direct client of the primary; deletes the test's prefix afterwards."""
    client = aioredis.Redis(port=deployment.primary.port)
    yield client
    async for key in client.scan_iter(match=Keys(prefix).scan_pattern()):
        await client.unlink(key)
    await client.aclose()


def push_config(task_id: str) -> TaskPushNotificationConfig:
    return TaskPushNotificationConfig(task_id=task_id, id="hook", url="https://example.test/h")


async def exercise(backend: RedisBackend, task_id: str) -> None:
    """Every component once: save, get, list, live subscribe, push configs, delete."""
    task = make_task(task_id, state=WORKING)
    v1 = await backend.task_store.save(
        task, event=task, prev_version=TaskVersion.MISSING, context=ctx()
    )
    stored = await backend.task_store.get(task_id, ctx())
    assert stored is not None and stored.version == v1
    listed = await backend.task_store.list(ListTasksRequest(), ctx())
    assert [t.id for t in listed.tasks] == [task_id]

    async def first_event() -> VersionedEvent:
        async for item in backend.event_stream.subscribe(task_id, after=v1):
            return item
        raise AssertionError("the stream ended")

    follower = asyncio.create_task(first_event())
    while not backend.listener.stats()["subscribers"]:  # joined (bounded by the test timeout)
        await asyncio.sleep(0.01)
    event = numbered(1, task_id)
    v2 = await backend.task_store.save(task, event=event, prev_version=v1, context=ctx())
    await backend.event_stream.publish(task_id, VersionedEvent(event, v2))
    got = await asyncio.wait_for(follower, GUARD)
    assert (got.version, got.event.metadata["n"]) == (v2, "1")
    await backend.push_config_store.set_info(task_id, push_config(task_id), ctx())
    assert [c.id for c in await backend.push_config_store.get_info(task_id, ctx())] == ["hook"]
    await backend.push_config_store.delete_info(task_id, ctx(), "hook")
    await backend.task_store.delete(task_id, ctx())
    assert await backend.task_store.get(task_id, ctx()) is None


async def test_from_url_reaches_the_master_through_the_sentinels(
    deployment: SentinelDeployment, admin: aioredis.Redis, prefix: str
):
    async with RedisBackend.from_url(deployment.url, prefix=prefix) as backend:
        await exercise(backend, "t")
        pool = backend.redis.connection_pool
        assert isinstance(pool, SentinelBlockingConnectionPool)
        assert pool.master_address == ("127.0.0.1", deployment.primary.port)
        assert (await backend.health())["ok"] is True
        sentinels = pool.sentinel_manager.sentinels
        assert any(s.connection_pool._available_connections for s in sentinels)
    # the backend made the client, so closing it closed the Sentinel connections too
    for sentinel in sentinels:
        assert not any(c.is_connected for c in sentinel.connection_pool._available_connections)


async def test_a_user_owned_sentinel_client_works_and_stays_open(
    deployment: SentinelDeployment, admin: aioredis.Redis, prefix: str
):
    sentinel = Sentinel(deployment.sentinel_addresses, sentinel_kwargs={"socket_timeout": 5})
    client = sentinel.master_for(SERVICE, socket_timeout=10)
    try:
        async with RedisBackend(client, prefix=prefix) as backend:
            await exercise(backend, "t")
            # WatchedTransaction on redis-py's SentinelConnectionPool: of 20 concurrent
            # first writes on 20 connections, exactly one wins
            task = make_task("race", state=WORKING)
            results = await asyncio.gather(
                *(
                    backend.task_store.save(
                        task, event=task, prev_version=TaskVersion.MISSING, context=ctx()
                    )
                    for _ in range(20)
                ),
                return_exceptions=True,
            )
            assert sum(not isinstance(r, BaseException) for r in results) == 1
            assert len(client.connection_pool._available_connections) > 1
        assert await client.ping() is True  # the backend did not close the owner's client
    finally:
        await client.aclose()
        await sentinel.aclose()


async def test_the_blocking_pool_makes_a_burst_wait_for_a_connection(
    deployment: SentinelDeployment, admin: aioredis.Redis, prefix: str
):
    async with RedisBackend.from_url(
        deployment.url, prefix=prefix, max_connections=2, pool_timeout=GUARD
    ) as backend:
        versions = await asyncio.gather(
            *(
                backend.task_store.save(
                    make_task(f"t{i}"), prev_version=TaskVersion.MISSING, context=ctx()
                )
                for i in range(30)
            )
        )
        assert versions == [TaskVersion(1)] * 30
        pool = backend.redis.connection_pool
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 2


# -- durability: WAIT ------------------------------------------------------------------
async def wait_calls(admin: aioredis.Redis) -> int:
    stats = await admin.info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


async def on_replica(deployment: SentinelDeployment, key: str, field: bytes) -> bytes | None:
    """A field as the replica has it now (no waiting)."""
    assert deployment.replica is not None
    replica = aioredis.Redis(port=deployment.replica.port)
    try:
        value: bytes | None = await replica.hget(key, field)
        return value
    finally:
        await replica.aclose()


async def test_every_acknowledged_write_is_on_the_replica_when_acknowledged(
    deployment: SentinelDeployment, admin: aioredis.Redis, prefix: str
):
    keys = Keys(prefix)
    async with RedisBackend.from_url(  # WAIT may take long on a loaded machine: a hang guard
        deployment.url, prefix=prefix, socket_timeout=30, durability=Durability(1, 20)
    ) as backend:

        async def waits_of(write: object) -> int:
            before = await wait_calls(admin)
            await write  # type: ignore[misc]
            return await wait_calls(admin) - before

        async with RedisBackend.from_url(deployment.url, prefix=prefix) as warm:
            await exercise(warm, "warm")  # loads the scripts: a NOSCRIPT retry WAITs twice
        task = make_task("t", state=WORKING)
        first = backend.task_store.save(
            task, event=task, prev_version=TaskVersion.MISSING, context=ctx()
        )
        assert await waits_of(first) == 1
        for version in range(2, 12):  # each save is on the replica as soon as it returns
            event = numbered(version, "t")
            await backend.task_store.save(
                task, event=event, prev_version=TaskVersion(version - 1), context=ctx()
            )
            assert await on_replica(deployment, keys.task("t"), F_VERSION) == str(version).encode()
        # the store appended the event: publish costs nothing, WAIT included
        assert (
            await waits_of(
                backend.event_stream.publish("t", VersionedEvent(event, TaskVersion(11)))
            )
            == 0
        )
        reply = Message(message_id="m", role=Role.ROLE_AGENT, parts=[Part(text="hi")])
        assert (
            await waits_of(
                backend.event_stream.publish("t", VersionedEvent(reply, TaskVersion(11)))
            )
            == 1
        )
        assert await waits_of(
            backend.push_config_store.set_info("t", push_config("t"), ctx())
        ) == 1  # fmt: skip
        assert await on_replica(deployment, keys.push_configs("t"), b"#seq") == b"1"
        assert await waits_of(backend.push_config_store.delete_info("t", ctx(), "hook")) == 1
        queue = EventQueueLegacy()
        await backend.queue_manager.add("q", queue)
        assert await waits_of(queue.enqueue_event(numbered(1, "q"))) == 1
        await queue.dequeue_event()  # the consumer's part: close() waits for the drain
        queue.task_done()
        assert await waits_of(backend.queue_manager.close("q")) == 1
        assert await waits_of(backend.task_store.delete("t", ctx())) == 1
        assert await on_replica(deployment, keys.task("t"), F_VERSION) is None
        # NOSCRIPT: the batch is loaded, run, and confirmed (the first WAIT, pipelined
        # behind the refused EVALSHA, confirms nothing, so there are two)
        await admin.script_flush()
        publish = backend.event_stream.publish("t", VersionedEvent(reply, TaskVersion(12)))
        assert await waits_of(publish) == 2
        assert deployment.replica is not None
        replica = aioredis.Redis(port=deployment.replica.port)
        try:
            assert await replica.xlen(keys.events("t")) == 1
        finally:
            await replica.aclose()


async def test_without_durability_no_write_waits(
    deployment: SentinelDeployment, admin: aioredis.Redis, prefix: str
):
    async with RedisBackend.from_url(deployment.url, prefix=prefix) as backend:
        before = await wait_calls(admin)
        await exercise(backend, "t")
        assert await wait_calls(admin) == before


async def test_a_write_the_replica_does_not_confirm_raises_naming_the_key_and_stays_applied(
    deployment: SentinelDeployment, admin: aioredis.Redis, prefix: str
):
    keys = Keys(prefix)
    assert deployment.replica is not None and deployment.replica.pid is not None
    replica_pid = deployment.replica.pid
    short = RedisBackend.from_url(deployment.url, prefix=prefix, durability=Durability(1, 0.2))
    patient = RedisBackend.from_url(
        deployment.url, prefix=prefix, socket_timeout=30, durability=Durability(1, 20)
    )
    records = short.task_store._records
    task = make_task("t", state=WORKING)
    try:
        v1 = await patient.task_store.save(
            task, event=task, prev_version=TaskVersion.MISSING, context=ctx()
        )
        os.kill(replica_pid, signal.SIGSTOP)  # the replica stops reading its link
        try:
            with pytest.raises(ReplicationTimeoutError) as e:
                await short.task_store.save(
                    task, event=numbered(2, "t"), prev_version=v1, context=ctx()
                )
            assert e.value.key == keys.task("t")
            assert (e.value.acked, e.value.required) == (0, 1)
            assert "applied on the primary" in str(e.value)
            stored = await short.task_store.get("t", ctx())  # applied, not rolled back
            assert stored is not None and stored.version == TaskVersion(2)

            reply = Message(message_id="m", role=Role.ROLE_AGENT, parts=[Part(text="x")])
            with pytest.raises(ReplicationTimeoutError) as e:
                await short.event_stream.publish("t", VersionedEvent(reply, TaskVersion(2)))
            assert e.value.key == keys.events("t")
            with pytest.raises(ReplicationTimeoutError) as e:
                await short.push_config_store.set_info("t", push_config("t"), ctx())
            assert e.value.key == keys.push_configs("t")

            # A retry that finds its own earlier commit (a lost reply) confirms it with
            # WAIT too, rather than acknowledging a write no replica has.
            write_id, event = os.urandom(8), numbered(3, "t")

            def decide(old: object) -> int:
                return 3

            entry = encode_event(0, event, key=keys.events("t"))  # (each attempt sets v)
            attempt = (keys.task("t"), task, task.SerializeToString(), "alice", entry)
            with pytest.raises(ReplicationTimeoutError):
                await records._attempt(*attempt, decide, write_id, None)
            with pytest.raises(ReplicationTimeoutError):  # the recovery path waits as well
                await records._attempt(*attempt, decide, write_id, None)
        finally:
            os.kill(replica_pid, signal.SIGCONT)
        committed = await patient.task_store._records._attempt(*attempt, decide, write_id, None)
        assert committed is not None and committed[:2] == (3, 0)
        assert await on_replica(deployment, keys.task("t"), F_VERSION) == b"3"
        stored = await patient.task_store.get("t", ctx())
        assert stored is not None and stored.version == TaskVersion(3)
    finally:
        await short.aclose()
        await patient.aclose()


def test_durability_settings_are_validated():
    for bad in ({"replicas": -1}, {"timeout": 0}, {"timeout": -1.0}):
        with pytest.raises(ValueError):
            Durability(**bad)  # type: ignore[arg-type]
    assert Durability().waits is False
    assert Durability(2, 0.0001).wait_command() == (b"WAIT", 2, 1)  # never WAIT ... 0


# -- doctor ----------------------------------------------------------------------------
def test_doctor_shows_the_topology_and_warns_of_unpersisted_nodes(
    deployment: SentinelDeployment, capsys: pytest.CaptureFixture[str]
):
    assert deployment.replica is not None
    code = cli(["doctor", "--url", deployment.url])
    out = capsys.readouterr().out
    assert "3 in the URL, 3 answered; 3 monitor 'mymaster'" in out
    assert "quorum 2" in out
    assert f"mymaster at 127.0.0.1:{deployment.primary.port}, flags master" in out
    assert f"replica      127.0.0.1:{deployment.replica.port}, link ok" in out
    assert f"replica 127.0.0.1:{deployment.replica.port} has no persistence" in out
    assert f"the master 127.0.0.1:{deployment.primary.port} has no persistence" in out
    assert "role master" in out  # then the master's own report
    assert "2 problem(s) found" in out
    assert code == 3


def test_doctor_is_healthy_once_persisted_and_warns_of_eviction_and_a_dead_sentinel(
    deployment: SentinelDeployment, capsys: pytest.CaptureFixture[str]
):
    assert deployment.replica is not None

    async def config(port: int, *pairs: str) -> None:
        client = aioredis.Redis(port=port)
        try:
            for name, value in zip(pairs[::2], pairs[1::2], strict=True):
                await client.config_set(name, value)
        finally:
            await client.aclose()

    nodes = (deployment.primary.port, deployment.replica.port)
    try:
        for port in nodes:
            asyncio.run(config(port, "save", "3600 1"))
        assert cli(["doctor", "--url", deployment.url]) == 0
        assert "healthy: no problem found" in capsys.readouterr().out

        asyncio.run(config(deployment.primary.port, "maxmemory-policy", "allkeys-lru"))
        dead = free_port()
        url = deployment.url.replace("/mymaster", f",127.0.0.1:{dead}/mymaster")
        assert cli(["doctor", "--url", url]) == 3
        out = capsys.readouterr().out
        assert f"Sentinel 127.0.0.1:{dead} is unreachable" in out
        assert "4 in the URL, 3 answered" in out
        assert "maxmemory-policy is 'allkeys-lru'" in out
    finally:
        asyncio.run(config(deployment.primary.port, "maxmemory-policy", "noeviction"))
        for port in nodes:
            asyncio.run(config(port, "save", ""))


def test_doctor_warns_of_a_lone_sentinel_without_replica(capsys: pytest.CaptureFixture[str]):
    with SentinelDeployment(sentinels=1, replica=False, down_after_ms=5000) as lone:
        assert cli(["doctor", "--url", lone.url]) == 3
        out = capsys.readouterr().out
        assert "only 1 Sentinel(s) monitor 'mymaster'" in out
        assert "no replica: a failover has nothing to promote" in out


def test_the_task_commands_take_a_sentinel_url(
    deployment: SentinelDeployment, prefix: str, capsys: pytest.CaptureFixture[str]
):
    async def seed() -> None:
        async with RedisBackend.from_url(deployment.url, prefix=prefix) as backend:
            await backend.task_store.save(
                make_task("seen"), prev_version=TaskVersion.MISSING, context=ctx("")
            )

    async def clean() -> None:
        async with RedisBackend.from_url(deployment.url, prefix=prefix) as backend:
            await backend.task_store.delete("seen", ctx(""))

    asyncio.run(seed())
    try:
        assert cli(["tasks", "--url", deployment.url, "--prefix", prefix]) == 0
        assert "seen" in capsys.readouterr().out
    finally:
        asyncio.run(clean())


def test_doctor_of_a_url_with_no_sentinel_answering_is_an_error(
    capsys: pytest.CaptureFixture[str],
):
    url = f"redis+sentinel://127.0.0.1:{free_port()}/mymaster"
    assert cli(["doctor", "--url", url]) == 1
    assert "No master found for 'mymaster'" in capsys.readouterr().err


# -- a server without our scripts (a promoted replica: scripts are not replicated) ----------
async def test_a_save_on_a_server_without_the_batch_script_is_not_a_lost_race(
    deployment: SentinelDeployment, admin: aioredis.Redis, prefix: str
):
    store = VersionedRedisTaskStore(admin, prefix=prefix, max_attempts=1)
    task = make_task("t", state=WORKING)
    version = await store.save(task, event=task, prev_version=TaskVersion.MISSING, context=ctx())
    await admin.script_flush()  # as on a replica promoted by a failover
    version = await store.save(task, event=numbered(1, "t"), prev_version=version, context=ctx())
    assert version == TaskVersion(2)
    stored = await store.get("t", ctx())
    assert stored is not None and stored.version == TaskVersion(2)
    assert await admin.xlen(Keys(prefix).events("t")) == 2


async def test_after_noscript_a_key_changed_meanwhile_is_still_a_conflict(
    deployment: SentinelDeployment, admin: aioredis.Redis, prefix: str
):
    key = Keys(prefix).task("t")
    await admin.hset(key, "v", "1")
    other = aioredis.Redis(port=deployment.primary.port)
    try:
        async with WatchedTransaction(admin, key) as tx:
            assert await tx.watch([key], [("HGET", key, "v")]) == [b"1"]
            await other.hset(key, "v", "2")  # another writer commits first
            await admin.script_flush()
            assert await tx.commit([("HSET", key, "v", "3")]) is None
    finally:
        await other.aclose()
    assert await admin.hget(key, "v") == b"2"


def test_doctor_pointed_at_a_sentinel_itself_says_which_url_to_use(
    deployment: SentinelDeployment, capsys: pytest.CaptureFixture[str]
):
    assert cli(["doctor", "--url", f"redis://127.0.0.1:{deployment.sentinels[0].port}"]) == 3
    assert "use redis+sentinel://HOST:PORT/SERVICE" in capsys.readouterr().out


async def test_a_wait_longer_than_the_socket_timeout_is_refused(
    deployment: SentinelDeployment, admin: aioredis.Redis, prefix: str
):
    async with RedisBackend.from_url(
        deployment.url, prefix=prefix, socket_timeout=2, durability=Durability(1, 2)
    ) as backend:
        reply = Message(message_id="m", role=Role.ROLE_AGENT, parts=[Part(text="x")])
        with pytest.raises(ValueError, match="socket_timeout"):
            await backend.event_stream.publish("t", VersionedEvent(reply, TaskVersion(1)))
        assert await admin.exists(Keys(prefix).events("t")) == 0
