"""A stalled server (CLIENT PAUSE on a private server): everything completes after, once."""

from __future__ import annotations

import redis.asyncio as aioredis
from a2a.server.cluster import TaskVersion

from a2a_redis.ops.embedded import EmbeddedServer
from tests.helpers import Follow, backend_pair, ctx, start_task, write_numbered

GUARD = 30  # seconds: a hang guard only


async def test_client_pause_delays_but_loses_and_duplicates_nothing(
    private_server: EmbeddedServer, prefix: str
):
    url = private_server.url
    # socket_timeout 10 s (the default) > the pause
    async with backend_pair(url, prefix) as (a, b), aioredis.Redis.from_url(url) as admin:
        task, version = await start_task(a.task_store)
        follower = Follow(b.event_stream.subscribe("t", after=version), last=29, guard=GUARD)

        async def writer(first: int) -> None:
            nonlocal version
            for n in range(first, first + 10):
                version = await write_numbered(a, task, version, n)

        await writer(0)
        # The subscriber has them: it is past its backlog read and follows live.
        await follower.until(10)
        await admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
        await writer(10)  # each save waits out the pause, then goes through
        await writer(20)
        assert await follower.ended() is None
        assert follower.ns == list(range(30))  # every event once, in order
        stored = await a.task_store.get("t", ctx())
        assert stored is not None
        assert stored.version == TaskVersion(31)
        assert await admin.xlen(a.task_store.keys.events("t")) == 31  # no duplicate entry
