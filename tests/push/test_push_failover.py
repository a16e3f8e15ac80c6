"""Push delivery through a Sentinel failover (``tests/deployments.py``: a primary, a replica,
three Sentinels). ``SENTINEL FAILOVER`` promotes the replica while a task's events are being
delivered; the old primary lives on as a replica. The senders' blocked job reads, their
pooled connections and the jobs' event followers move to the new primary: every event still
arrives, in order (a notification may come twice, with its id, across the switch).
The Cluster path is every other push test: they run on the embedded Redis Cluster too.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.types.a2a_pb2 import Task, TaskState

from a2a_redis import RedisBackend, RedisUnavailableError
from tests.deployments import SERVICE, SentinelDeployment
from tests.helpers import backend_pair, ctx, eventually, numbered, start_task
from tests.push.receiver import running_receiver
from tests.push.test_delivery import configure, expected, sender_for, sequence
from tests.push.test_replicas import firsts

GUARD = 60  # seconds: a hang guard only


async def save(backend: RedisBackend, task: Task, version: TaskVersion, n: int) -> TaskVersion:
    """Save and publish event ``n`` (COMPLETED at 9), retrying outage errors; the version."""
    state = TaskState.TASK_STATE_COMPLETED if n == 9 else TaskState.TASK_STATE_WORKING
    event = numbered(n, task.id, state)
    task.status.state = state
    while True:
        try:
            version = await backend.task_store.save(
                task, event=event, prev_version=version, context=ctx()
            )
            break
        except RedisUnavailableError:
            await asyncio.sleep(0.05)
    await backend.event_stream.publish(task.id, VersionedEvent(event, version))
    return version


async def test_delivery_goes_on_through_a_sentinel_failover(prefix: str) -> None:
    with SentinelDeployment(down_after_ms=5000) as deployment:
        pair = backend_pair(deployment.url, prefix, socket_connect_timeout=1)
        async with running_receiver() as receiver, pair as (a, b):
            senders = [sender_for(a), sender_for(b)]
            for s in senders:
                await s.start()
            try:
                await configure(a, "t", receiver, "x")
                task, version = await start_task(a.task_store)
                for n in range(5):
                    version = await save(a, task, version, n)
                await eventually(lambda: len(receiver.delivered("x")) >= 6, what="before")
                old_port = await deployment.master_port()
                sentinel = aioredis.Redis(port=deployment.sentinels[0].port)
                try:
                    assert await sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
                finally:
                    await sentinel.aclose()
                await deployment.wait_failover(old_port, GUARD)
                for n in range(5, 10):
                    version = await save(a, task, version, n)
                await eventually(
                    lambda: len(firsts(receiver.delivered("x"))) >= 11, what="every event"
                )
                assert sequence(firsts(receiver.delivered("x"))) == expected(9)
                await eventually(
                    lambda: not any(s.stats()["jobs"] for s in senders), what="the job ended"
                )
            finally:
                for s in senders:
                    await s.aclose()
