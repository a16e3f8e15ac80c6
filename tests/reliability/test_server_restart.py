"""Kill the server (SIGKILL) mid-stream and restart it: typed errors, then recovery, no loss.

The embedded server runs with AOF (appendfsync always) so that acknowledged writes survive.
"""

from __future__ import annotations

import asyncio

import pytest
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.types.a2a_pb2 import ListTasksRequest, TaskState

from a2a_redis import RedisBackend, RedisUnavailableError
from a2a_redis.ops.embedded import EmbeddedServer
from tests.helpers import ctx, eventually, make_task, numbered

GUARD = 30  # seconds: a hang guard only


async def test_sigkill_and_restart_mid_stream_loses_nothing(prefix: str):
    with EmbeddedServer(appendonly=True) as server:
        a = RedisBackend.from_url(server.url, prefix=prefix, socket_connect_timeout=1)
        b = RedisBackend.from_url(server.url, prefix=prefix, socket_connect_timeout=1)
        try:
            task = make_task("t", state=TaskState.TASK_STATE_WORKING)
            version = await a.task_store.save(
                task, event=task, prev_version=TaskVersion.MISSING, context=ctx()
            )
            received: list[int] = []
            done = asyncio.Event()

            async def follow() -> None:
                async for item in b.event_stream.subscribe("t", after=version):
                    received.append(int(item.event.metadata["n"]))
                    if len(received) == 20:
                        done.set()
                        return

            follower = asyncio.create_task(follow())

            async def write(n: int) -> None:
                nonlocal version
                event = numbered(n, "t")
                version = await a.task_store.save(
                    task, event=event, prev_version=version, context=ctx()
                )
                await a.event_stream.publish("t", VersionedEvent(event, version))

            for n in range(10):
                await write(n)
            acknowledged = version
            for _ in range(GUARD * 100):  # the subscriber is live (a new one would fail fast)
                if len(received) == 10:
                    break
                await asyncio.sleep(0.01)
            assert received == list(range(10))
            server.kill()  # SIGKILL: no shutdown, no flush beyond what AOF already holds

            # During the outage: typed errors, never "not found"; the subscriber waits.
            for call in (
                a.task_store.get("t", ctx()),
                a.task_store.save(task, prev_version=version, context=ctx()),
                a.task_store.list(ListTasksRequest(), ctx()),
            ):
                with pytest.raises(RedisUnavailableError):
                    await call
            assert not follower.done()
            assert (await a.health())["ok"] is False
            # B's listener has seen its connection go: redis-py's own reconnect attempts
            # (a fraction of a second) failed. Restarted before that, the server would be
            # reached by them and the listener would count no reconnect.
            await eventually(lambda: not b.listener.connected, what="B sees the outage")

            server.start()  # same port, same AOF: acknowledged writes come back
            stored = await a.task_store.get("t", ctx())
            assert stored is not None
            assert stored.version == acknowledged
            for n in range(10, 20):
                await write(n)
            await asyncio.wait_for(done.wait(), GUARD)
            assert received == list(range(20))  # every event once, in order
            assert b.listener.stats()["reconnects"] >= 1
            await asyncio.wait_for(follower, GUARD)
            assert (await b.health())["ok"] is True
        finally:
            await a.aclose()
            await b.aclose()
