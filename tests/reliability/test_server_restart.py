"""Kill the server (SIGKILL) mid-stream and restart it: typed errors, then recovery, no loss.

The embedded server runs with AOF (appendfsync always) so that acknowledged writes survive.
"""

from __future__ import annotations

import pytest
from a2a.types.a2a_pb2 import ListTasksRequest

from a2a_redis import RedisUnavailableError
from a2a_redis.ops.embedded import EmbeddedServer
from tests.helpers import Follow, backend_pair, ctx, eventually, start_task, write_numbered

GUARD = 30  # seconds: a hang guard only


async def test_sigkill_and_restart_mid_stream_loses_nothing(
    durable_server: EmbeddedServer, prefix: str
):
    server = durable_server
    async with backend_pair(server.url, prefix, socket_connect_timeout=1) as (a, b):
        task, version = await start_task(a.task_store)
        follower = Follow(b.event_stream.subscribe("t", after=version), last=19, guard=GUARD)
        for n in range(10):
            version = await write_numbered(a, task, version, n)
        acknowledged = version
        await follower.until(10)  # the subscriber is live (a new one would fail fast)
        assert follower.ns == list(range(10))
        server.kill()  # SIGKILL: no shutdown, no flush beyond what AOF already holds

        # During the outage: typed errors, never "not found"; the subscriber waits.
        for call in (
            a.task_store.get("t", ctx()),
            a.task_store.save(task, prev_version=version, context=ctx()),
            a.task_store.list(ListTasksRequest(), ctx()),
        ):
            with pytest.raises(RedisUnavailableError):
                await call
        assert not follower.task.done()
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
            version = await write_numbered(a, task, version, n)
        assert await follower.ended() is None
        assert follower.ns == list(range(20))  # every event once, in order
        assert b.listener.stats()["reconnects"] >= 1
        assert (await b.health())["ok"] is True
