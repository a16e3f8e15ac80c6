"""A stalled server (CLIENT PAUSE on a private server): everything completes after, once."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.types.a2a_pb2 import TaskState, TaskStatusUpdateEvent

from a2a_redis import RedisBackend
from a2a_redis.ops.embedded import EmbeddedServer
from tests.helpers import ctx, eventually, make_task

GUARD = 30  # seconds: a hang guard only


async def test_client_pause_delays_but_loses_and_duplicates_nothing(prefix: str):
    with EmbeddedServer() as server:
        a = RedisBackend.from_url(server.url, prefix=prefix)  # socket_timeout 10 s > the pause
        b = RedisBackend.from_url(server.url, prefix=prefix)
        admin = aioredis.Redis.from_url(server.url)
        try:
            task = make_task("t", state=TaskState.TASK_STATE_WORKING)
            version = await a.task_store.save(
                task, event=task, prev_version=TaskVersion.MISSING, context=ctx()
            )
            received: list[int] = []

            async def follow() -> None:
                async for item in b.event_stream.subscribe("t", after=version):
                    received.append(int(item.event.metadata["n"]))
                    if len(received) == 30:
                        return

            follower = asyncio.create_task(follow())

            async def writer(first: int) -> None:
                nonlocal version
                for n in range(first, first + 10):
                    event = TaskStatusUpdateEvent(task_id="t", context_id="ctx")
                    event.metadata["n"] = str(n)
                    event.status.state = TaskState.TASK_STATE_WORKING
                    version = await a.task_store.save(
                        task, event=event, prev_version=version, context=ctx()
                    )
                    await a.event_stream.publish("t", VersionedEvent(event, version))

            await writer(0)
            # The subscriber has them: it is past its backlog read and follows live.
            await eventually(lambda: len(received) == 10 or follower.done())
            await admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
            await writer(10)  # each save waits out the pause, then goes through
            await writer(20)
            await asyncio.wait_for(follower, GUARD)
            assert received == list(range(30))  # every event once, in order
            stored = await a.task_store.get("t", ctx())
            assert stored is not None
            assert stored.version == TaskVersion(31)
            assert await admin.xlen(a.task_store.keys.events("t")) == 31  # no duplicate entry
        finally:
            await a.aclose()
            await b.aclose()
            await admin.aclose()
