"""Sentinel failover mid-stream: SIGKILL the primary while a task streams events.

A primary, one replica and three Sentinels run locally (tests/deployments.py). Replica A
writes a task's events through ``RedisBackend.from_url("redis+sentinel://...")`` with
``Durability(replicas=1)``; replica B follows the task's stream through a user-owned
``Sentinel.master_for`` client. The primary dies mid-stream; the Sentinels promote the
replica; the old primary comes back empty and is made a replica of the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from a2a.server.cluster import ConcurrentTaskModificationError, TaskVersion, VersionedEvent
from a2a.types.a2a_pb2 import Task
from redis.asyncio.sentinel import Sentinel

from a2a_redis import (
    A2ARedisError,
    Durability,
    RedisBackend,
    RedisUnavailableError,
    ReplicationTimeoutError,
)
from a2a_redis.log.codec import decode_event, version_int
from a2a_redis.log.keys import Keys
from tests.deployments import SERVICE, SentinelDeployment
from tests.helpers import Follow, backend_pair, ctx, numbered, start_task, write_numbered

GUARD = 60  # seconds: a hang guard only
logger = logging.getLogger(__name__)


@dataclass
class Writer:
    """Saves event 0, 1, 2, ... of task "t" as a caller of the SDK would, until stopped.

    ``acked``: n -> version of the saves that returned (confirmed by WAIT 1).
    ``unconfirmed``: n of the saves applied on a primary no replica confirmed.
    """

    backend: RedisBackend
    task: Task
    version: TaskVersion
    acked: dict[int, TaskVersion] = field(default_factory=dict)
    unconfirmed: list[int] = field(default_factory=list)
    outage_errors: int = 0
    n: int = 0
    stop: bool = False
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    done_at: list[float] = field(default_factory=list)  # loop time each write completed

    async def _reload(self) -> tuple[TaskVersion, str]:
        while True:
            try:
                stored = await self.backend.task_store.get("t", ctx())
                assert stored is not None
                metadata = stored.task.metadata
                return stored.version, dict(metadata.items()).get("n", "")
            except RedisUnavailableError:
                await asyncio.sleep(0.05)

    async def _write(self, n: int) -> None:
        """Write event n until it is in; record how it went."""
        event = numbered(n)
        self.task.metadata["n"] = str(n)  # the record names the event that produced it
        while True:
            try:
                self.version = await self.backend.task_store.save(
                    self.task, event=event, prev_version=self.version, context=ctx()
                )
                self.acked[n] = self.version
                break
            except RedisUnavailableError:
                self.outage_errors += 1
            except ReplicationTimeoutError:  # applied on the primary; no replica confirmed
                self.version, stored_n = await self._reload()
                assert stored_n == str(n)
                self.unconfirmed.append(n)
                break
            except ConcurrentTaskModificationError:
                # an attempt whose reply was lost had committed: reload, check it is ours
                self.version, stored_n = await self._reload()
                if stored_n == str(n):
                    break
            await asyncio.sleep(0.05)
        with contextlib.suppress(A2ARedisError):  # as the SDK does after a save
            await self.backend.event_stream.publish("t", VersionedEvent(event, self.version))

    async def run(self) -> None:
        try:
            while not self.stop:
                await self._write(self.n)
                self.done_at.append(asyncio.get_running_loop().time())
                self.n += 1
                self.progress.set()
                await asyncio.sleep(0.005)
        except BaseException as e:
            self.error = e
            self.progress.set()
            raise

    async def until(self, condition: object) -> None:
        """Wait (bounded) until ``condition()`` holds, checking after each write."""

        async def wait() -> None:
            while not condition():  # type: ignore[operator]
                assert self.error is None, self.error
                self.progress.clear()
                await self.progress.wait()

        await asyncio.wait_for(wait(), GUARD)


async def test_primary_killed_mid_stream_fails_over_without_losing_acknowledged_writes(
    prefix: str,
):
    with SentinelDeployment(down_after_ms=1000, failover_timeout_ms=3000) as deployment:
        durability = Durability(replicas=1, timeout=2.0)
        a = RedisBackend.from_url(
            deployment.url,
            prefix=prefix,
            durability=durability,
            socket_timeout=5,
            socket_connect_timeout=1,
        )
        sentinel = Sentinel(
            deployment.sentinel_addresses,
            sentinel_kwargs={"socket_timeout": 1, "socket_connect_timeout": 1},
        )
        b_client = sentinel.master_for(SERVICE, socket_timeout=5, socket_connect_timeout=1)
        b = RedisBackend(b_client, prefix=prefix)  # a client the test owns
        try:
            task, first = await start_task(a.task_store)
            writer = Writer(a, task, first)
            loop = asyncio.get_running_loop()
            follower = Follow(b.event_stream.subscribe("t", after=first), guard=GUARD)
            while not b.listener.stats()["subscribers"]:  # joined (bounded by the timeout)
                await asyncio.sleep(0.01)
            writing = asyncio.create_task(writer.run())

            # 1. Mid-stream: SIGKILL the primary.
            await writer.until(lambda: len(follower.events) >= 30)
            old_port = await deployment.master_port()
            assert old_port == deployment.primary.port
            acked_before = dict(writer.acked)
            deployment.primary.kill()
            killed_at, written_before = loop.time(), len(writer.done_at)

            # 2. The Sentinels promote the replica; the same clients reach it, and with no
            #    replica left, WAIT 1 cannot be met: writes are applied, not confirmed.
            assert deployment.replica is not None
            new_port = await deployment.wait_failover(old_port, GUARD)
            promoted_at = loop.time()
            assert new_port == deployment.replica.port
            await writer.until(lambda: writer.unconfirmed)

            # 3. The old primary returns (empty: no persistence) and the Sentinels make it
            #    a replica of the new master: writes are confirmed again.
            deployment.primary.start()
            restarted_at, confirmed_after = loop.time(), len(writer.acked)
            await writer.until(lambda: len(writer.acked) >= confirmed_after + 1)
            reconfirmed_at = loop.time()
            await writer.until(lambda: len(writer.acked) >= confirmed_after + 20)
            writer.stop = True
            await asyncio.wait_for(writing, GUARD)
            total = writer.n

            # Every event once, in order, on the subscriber that never restarted.
            await follower.until(total)
            assert follower.ns == list(range(total))

            # Every write acknowledged with WAIT 1 survived, at its version, once.
            promoted = aioredis.Redis(port=new_port)
            try:
                key = Keys(prefix).events("t")
                entries = [decode_event(key, fields) for _, fields in await promoted.xrange(key)]
            finally:
                await promoted.aclose()
            stored = {version: event.metadata["n"] for version, event in entries[1:]}
            versions = [version for version, _ in entries]
            for n, version in writer.acked.items():
                assert stored[version_int(version)] == str(n), (n, version)
                assert versions.count(version_int(version)) == 1, (n, version)
            assert acked_before  # some were acknowledged before the primary died
            stored_task = await b.task_store.get("t", ctx())
            assert stored_task is not None
            assert stored_task.version == writer.version
            assert stored_task.task.metadata["n"] == str(total - 1)

            # The clients followed the failover without a restart.
            assert a.redis.connection_pool.master_address == ("127.0.0.1", new_port)
            assert b_client.connection_pool.master_address == ("127.0.0.1", new_port)
            assert b.listener.stats()["reconnects"] >= 1
            assert writer.outage_errors >= 1
            assert (await a.health())["ok"] is True
            assert (await b.health())["ok"] is True
            await follower.close()
            delivered = [t for t in follower.times if t > killed_at]
            logger.info(
                "failover observed: promoted %.2f s after SIGKILL (as the Sentinels report "
                "it); writer blocked %.2f s (%d outage errors); %d writes applied but not "
                "confirmed while the new master had no replica; the returning old primary "
                "confirmed writes again %.2f s after its restart; subscriber's first event "
                "after the kill %.2f s after it; %d events, %d acknowledged",
                promoted_at - killed_at,
                writer.done_at[written_before] - killed_at,
                writer.outage_errors,
                len(writer.unconfirmed),
                reconfirmed_at - restarted_at,
                delivered[0] - killed_at,
                total,
                len(writer.acked),
            )
        finally:
            await a.aclose()
            await b.aclose()
            await b_client.aclose()
            await sentinel.aclose()


async def test_a_demoted_master_sends_writers_to_the_new_one(prefix: str):
    """SENTINEL FAILOVER: the old master lives on as a replica; pooled connections to it
    must not turn saves into READONLY errors: they reconnect through the Sentinels."""
    with SentinelDeployment(down_after_ms=5000) as deployment:
        pair = backend_pair(deployment.url, prefix, socket_connect_timeout=1)
        async with pair as (a, b):
            task, version = await start_task(a.task_store)
            follower = Follow(b.event_stream.subscribe("t", after=version), guard=GUARD)
            while not b.listener.stats()["subscribers"]:
                await asyncio.sleep(0.01)
            for n in range(5):  # pooled connections to the master that is about to step down
                # As the SDK does: publishing a running task's event holds its lease, whose
                # heartbeats tell B's subscriber that the owner lives through the failover.
                version = await write_numbered(a, task, version, n)
            old_port, new_port = await deployment.failover(GUARD)
            old = aioredis.Redis(port=old_port)
            try:  # the old master is alive, and a replica now
                while (await old.info("replication"))["role"] != "slave":
                    await asyncio.sleep(0.05)
            finally:
                await old.aclose()
            for n in range(5, 10):  # outage errors allowed while it settles; nothing else
                event = numbered(n)
                while True:
                    try:
                        version = await a.task_store.save(
                            task, event=event, prev_version=version, context=ctx()
                        )
                        break
                    except RedisUnavailableError:
                        await asyncio.sleep(0.05)
                await a.event_stream.publish("t", VersionedEvent(event, version))
            assert a.redis.connection_pool.master_address == ("127.0.0.1", new_port)
            await follower.until(10)
            assert follower.ns == list(range(10))
            await follower.close()
