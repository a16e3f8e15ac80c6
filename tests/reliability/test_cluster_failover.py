"""Redis Cluster failover mid-stream: SIGKILL the primary that owns a streaming task.

A 3-primary cluster with one replica each. The replica of the killed primary is promoted
(``cluster-node-timeout`` 1 s); writes meanwhile raise ``RedisUnavailableError`` (never "not
found"), then succeed on the promoted replica; the remote subscriber's shard connection
fails, the listener re-reads the slot map, subscribes on the new primary and backfills from
the stream: every acknowledged event arrives once, in order.
"""

from __future__ import annotations

import asyncio
import time

from a2a.server.cluster import TaskVersion, VersionedEvent
from redis.crc import key_slot

from a2a_redis import RedisUnavailableError
from a2a_redis.ops.embedded import EmbeddedCluster, EmbeddedServer, call
from tests.helpers import Follow, backend_pair, ctx, numbered, start_task

GUARD = 60  # seconds: a hang guard only


def replicated(primary: EmbeddedServer) -> bool:
    """True when the primary's replica has every byte of its replication stream."""
    info = call(primary.port, "INFO", "replication")
    fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
    offset = fields.get("master_repl_offset")
    slave = fields.get("slave0", "")
    return bool(slave) and f"offset={offset}," in slave + ","


async def test_primary_killed_mid_stream_fails_over_and_loses_nothing(prefix: str):
    with EmbeddedCluster(replicas=1, node_timeout=1000) as cluster:
        pair = backend_pair(cluster.url, prefix, socket_connect_timeout=1)
        async with pair as (writer, reader):
            task, version = await start_task(writer.task_store)
            total = 40
            subscription = reader.event_stream.subscribe("t", after=version)
            follower = Follow(subscription, last=total - 1, guard=GUARD)
            while not reader.listener.connected:
                await asyncio.sleep(0.01)
            slot = key_slot(writer.task_store.keys.task("t").encode())
            primary = cluster.node_for_slot(slot)
            outage_errors = 0
            for n in range(total):
                if n == total // 2:
                    deadline = time.monotonic() + GUARD
                    while not replicated(primary):  # what WAIT 1 would have ensured
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.01)
                    primary.kill()
                event = numbered(n)
                deadline = time.monotonic() + GUARD
                while True:  # what an application does with a typed outage error
                    try:
                        version = await writer.task_store.save(
                            task, event=event, prev_version=version, context=ctx()
                        )
                        break
                    except RedisUnavailableError:
                        outage_errors += 1
                        assert time.monotonic() < deadline, "the cluster never failed over"
                        await asyncio.sleep(0.2)
                await writer.event_stream.publish("t", VersionedEvent(event, version))
            assert await follower.ended() is None
            assert follower.ns == list(range(total))  # every event once, in order
            assert outage_errors > 0  # the outage was seen, as a typed error
            assert cluster.node_for_slot(slot) is not primary  # a replica was promoted
            stored = await reader.task_store.get("t", ctx())
            assert stored is not None and stored.version == TaskVersion(total + 1)
