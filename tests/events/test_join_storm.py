"""Join storms: thousands of subscribers joining at once share reads and a few connections.

When every client reconnects at once (a deploy, a load balancer restart), each join used
to take a pooled connection for its backlog read: redis-py's default pool (100) raised
``PoolExhaustedError`` at the 101st. Joins now share reads per task and pipeline them
across tasks (``events/backlog.py``, ``events/reads.py``).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from a2a.server.cluster import TaskVersion
from a2a.types.a2a_pb2 import TaskState

from a2a_redis.events.reads import PipelinedReads
from tests.events.test_event_stream import Replica, collect, produce
from tests.helpers import connect, on_every_node

MISSING = TaskVersion.MISSING
GUARD = 120  # seconds: a hang guard only, never an asserted bound
SUBSCRIBERS = 2000


async def connections_by_node(admin: Any, name: str) -> list[int]:
    """Connections named ``name`` on each node (CLIENT LIST)."""
    listed = await on_every_node(admin, "CLIENT", "LIST")
    per_node = listed.values() if isinstance(listed, dict) else [listed]
    needle = f" name={name} ".encode()
    return [sum(needle in line for line in bytes(listed).splitlines()) for listed in per_node]


def reader_client(url: str, name: str, pool: str) -> aioredis.Redis:
    """Replica B's client: redis-py's default pool (100), or the backend's blocking one."""
    if pool == "blocking":
        return connect(url, client_name=name, max_connections=64)
    return connect(url, client_name=name)


@pytest.mark.parametrize("pool", ["default", "blocking"])
@pytest.mark.parametrize("tasks", [1, 100])
async def test_a_join_storm_shares_reads_and_uses_a_few_connections(
    real_url: str, prefix: str, pool: str, tasks: int
) -> None:
    name = f"storm-{uuid.uuid4().hex[:8]}"
    a = Replica(connect(real_url), prefix)
    b = Replica(reader_client(real_url, name, pool), prefix)
    admin = connect(real_url)
    try:
        ids = [f"t{i}" for i in range(tasks)]
        for task_id in ids:
            await produce(a, task_id, [TaskState.TASK_STATE_WORKING])  # versions 1, 2
        # half from the start, half after the first event: both kinds of backlog read
        joins = [
            collect(b.stream, ids[k % tasks], MISSING if k % 2 else TaskVersion(1), 1)
            for k in range(SUBSCRIBERS)
        ]
        results = await asyncio.wait_for(asyncio.gather(*joins), GUARD)
        for k, got in enumerate(results):
            assert [g.version for g in got] == [TaskVersion(1 if k % 2 else 2)]
        # every connection B opened is still in its pool (or is the pub/sub one)
        per_node = await connections_by_node(admin, name)
        bound = 3 if tasks == 1 else 8  # beyond the pub/sub connection (one per node)
        assert max(per_node) <= bound + 1, per_node
    finally:
        await a.close()
        await b.close()
        await admin.aclose()


async def test_a_read_queued_as_the_last_sender_finishes_is_sent(
    redis: aioredis.Redis, prefix: str
) -> None:
    """A sender's done callback runs after the caller it answered: a read queued in between
    must start a sender of its own, not wait for ever (it hung 1,000 streaming tasks)."""
    reads = PipelinedReads(redis, max_in_flight=1)
    key = f"{prefix}:{{t:x}}:k"
    await redis.set(key, b"v")
    for _ in range(20):  # awaited directly: wait_for's own task would hide the race
        assert await reads.read(("GET", key)) == [b"v"]  # (the test's timeout guards)
    await reads.aclose()
