"""Connections killed mid-stream (CLIENT KILL, private server): retries without duplicates."""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
from a2a.server.cluster import (
    ConcurrentTaskModificationError,
    StoredTask,
    TaskVersion,
    VersionedEvent,
)
from a2a.types.a2a_pb2 import Task

from a2a_redis import RedisBackend, RedisUnavailableError
from a2a_redis.log.codec import decode_event
from a2a_redis.ops.embedded import EmbeddedServer
from tests.helpers import (
    Follow,
    backend_pair,
    ctx,
    eventually,
    numbered,
    start_task,
    subscriber_count,
)

GUARD = 60  # seconds: a hang guard only


async def reload(backend: RedisBackend) -> StoredTask:
    """The stored task, retried through killed connections."""
    while True:
        try:
            stored = await backend.task_store.get("t", ctx())
            assert stored is not None
            return stored
        except RedisUnavailableError:
            await asyncio.sleep(0.01)


async def write_until_in(
    backend: RedisBackend, task: Task, version: TaskVersion, n: int
) -> TaskVersion:
    """Save event n (as the SDK's caller would, until it is in) and publish it."""
    event = numbered(n, "t")
    while True:
        try:
            version = await backend.task_store.save(
                task, event=event, prev_version=version, context=ctx()
            )
            break
        except RedisUnavailableError:
            pass
        except ConcurrentTaskModificationError:
            # an attempt whose reply was lost had committed: reload, check it is ours
            stored = await reload(backend)
            version = stored.version
            if stored.task.metadata.get("n") == str(n):
                break
        await asyncio.sleep(0.01)
    task.metadata["n"] = str(n)
    with contextlib.suppress(RedisUnavailableError):
        await backend.event_stream.publish("t", VersionedEvent(event, version))
    return version


async def test_killed_connections_neither_lose_nor_duplicate_events(
    private_server: EmbeddedServer, prefix: str
):
    url = private_server.url
    async with backend_pair(url, prefix) as (a, b), aioredis.Redis.from_url(url) as admin:
        task, version = await start_task(a.task_store)
        writes = 150
        follower = Follow(
            b.event_stream.subscribe("t", after=version), last=writes - 1, guard=GUARD
        )
        # Subscribed on the server: the pub/sub kills below hit B's live connection.
        await eventually(lambda: subscriber_count(admin, b.task_store.keys.wake("t")))

        async def killer() -> None:
            for i in range(40):
                kind = "pubsub" if i % 3 == 0 else "normal"
                with contextlib.suppress(Exception):
                    await admin.execute_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes")
                await asyncio.sleep(0.02)

        kills = asyncio.create_task(killer())
        for n in range(writes):
            version = await write_until_in(a, task, version, n)
        await kills
        assert await follower.ended() is None

        assert follower.ns == list(range(writes))  # every event once, in order
        key = a.task_store.keys.events("t")
        log = [decode_event(key, f) for _, f in await admin.xrange(key)]
        versions = [v for v, _ in log]
        assert versions == list(range(1, writes + 2))  # one entry per accepted write
        stored = await a.task_store.get("t", ctx())
        assert stored is not None
        assert stored.version == TaskVersion(writes + 1)
