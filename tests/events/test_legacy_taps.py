"""Legacy remote taps: tap storms share reads, and appends are grouped across tasks.

``RedisQueueManager.tap`` reads the owner's lease and the stream's end through the
listener's pipelined reads, the stream's end shared per task (``events/backlog.py``,
``events/reads.py``), as the V2 event stream's joins do: hundreds of concurrent taps (a
wave of resubscribes after a deploy) need a few connections, not one each, and never
exhaust redis-py's default pool. On the owner's side, appends of concurrently enqueuing
tasks go out together (``plumbing.GroupedAppends``), each enqueue still returning only once
its own event is in the stream.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from a2a.server.events.event_queue import EventQueueLegacy
from a2a.types.a2a_pb2 import TaskState

from a2a_redis.connection.clients import client_from_url
from a2a_redis.connection.cluster import is_cluster
from a2a_redis.connection.transaction import Batch
from a2a_redis.errors import CorruptDataError
from a2a_redis.events.appends import EntryPacker, GroupedAppends, Write
from a2a_redis.events.queue_manager import RedisQueueManager
from a2a_redis.log.codec import encode_event, ends_task_stream
from a2a_redis.log.event_log import StreamRetention, append_commands
from a2a_redis.log.keys import Keys
from tests.events.test_join_storm import connections_by_node, reader_client
from tests.events.test_queue_manager import close_draining, drain
from tests.helpers import connect, numbered

GUARD = 120  # seconds: a hang guard only, never an asserted bound
TAPS = 200  # concurrent tap() calls: more than redis-py's default pool (100) holds


@pytest.mark.parametrize("pool", ["default", "blocking"])
@pytest.mark.parametrize("tasks", [1, 100])
async def test_a_tap_storm_shares_reads_and_uses_a_few_connections(
    real_url: str, prefix: str, pool: str, tasks: int
) -> None:
    name = f"tapstorm-{uuid.uuid4().hex[:8]}"
    owner = client_from_url(real_url)  # the backend's pool: closes' lease releases wait there
    reader = reader_client(real_url, name, pool)
    admin = connect(real_url)
    a = RedisQueueManager(owner, prefix=prefix)
    b = RedisQueueManager(reader, prefix=prefix)
    try:
        ids = [f"t{i}" for i in range(tasks)]
        queues = [await a.create_or_tap(task_id) for task_id in ids]
        for queue in queues:
            await queue.enqueue_event(numbered(0))  # before the taps: not theirs
        opened = await asyncio.wait_for(
            asyncio.gather(*(b.tap(ids[k % tasks]) for k in range(TAPS))), GUARD
        )
        taps = [t for t in opened if t is not None]
        assert len(taps) == TAPS
        # every connection B opened is still in its pool (or is the pub/sub one)
        per_node = await connections_by_node(admin, name)
        bound = 3 if tasks == 1 else 8  # beyond the pub/sub connection (one per node)
        assert max(per_node) <= bound + 1, per_node

        async def produce(i: int) -> None:
            for n in range(1, 4):
                await queues[i].enqueue_event(numbered(n))
            await close_draining(a, ids[i], queues[i])

        results = await asyncio.wait_for(
            asyncio.gather(*(drain(t) for t in taps), *(produce(i) for i in range(tasks))), GUARD
        )
        for got in results[:TAPS]:
            assert [int(e.metadata["n"]) for e in got] == [1, 2, 3]
    finally:
        await b.aclose()
        await a.aclose()
        for client in (owner, reader, admin):
            await client.aclose()


async def test_a_tap_that_meets_its_queues_close_mark_ends_at_once(managers, redis, prefix):
    """The lease read, then the queue closed (close mark, lease released): the tap ends.

    The lease is put back as it was when the tap read it, so that the tap finds the queue
    and only the stream's end tells it that this opening is over.
    """
    a, b = managers(), managers()
    queue = await a.create_or_tap("t")
    lease = Keys(prefix).lease("t")
    token = await redis.get(lease)
    assert token is not None
    await queue.enqueue_event(numbered(1))
    await close_draining(a, "t", queue)
    await redis.set(lease, token)  # as B read it, just before the close
    tap = await b.tap("t")
    assert tap is not None
    assert await drain(tap) == []  # ended by the close mark, not after a silent lease
    await redis.delete(lease)


async def test_concurrent_appends_share_round_trips_and_each_lands(managers, redis, prefix):
    """Twenty tasks enqueue at once: every event is in its stream, in order, when its
    enqueue returns, and the appends went out in fewer groups than there were events."""
    a = managers()
    queues = [await a.create_or_tap(f"t{i}") for i in range(20)]
    appends = a._log.appends
    sent = 0
    exchange = appends._exchange

    async def counted(packed: bytes) -> object:
        nonlocal sent
        sent += 1
        return await exchange(packed)

    appends._exchange = counted  # type: ignore[method-assign]
    keys = Keys(prefix)

    async def produce(i: int, queue: EventQueueLegacy) -> None:
        for n in range(10):
            await queue.enqueue_event(numbered(n, task_id=f"t{i}"))
            assert await redis.xlen(keys.events(f"t{i}")) == n + 1  # there when it returns

    await asyncio.wait_for(asyncio.gather(*(produce(i, q) for i, q in enumerate(queues))), GUARD)
    for i in range(20):
        rows = await redis.xrange(keys.events(f"t{i}"))
        assert [row[1][b"e"] for row in rows] == [
            encode_event(0, numbered(n, task_id=f"t{i}"))[b"e"] for n in range(10)
        ]
    if is_cluster(redis):
        assert sent == 0  # each append alone: a group would span slots
    else:
        assert 0 < sent < 200


async def test_a_refused_group_is_sent_again_one_append_at_a_time(redis, prefix):
    """One append of a group fails (its key holds a string): only its caller gets the
    error; the other appends of the group land."""
    keys = Keys(prefix)
    appends = GroupedAppends(redis)
    await redis.set(keys.events("bad"), b"not a stream")
    gate, calls = asyncio.Event(), []
    exchange = appends._exchange

    async def gated(packed: bytes) -> object:
        calls.append(packed)
        if len(calls) == 1:
            await gate.wait()  # the first group stays on the wire while the others queue
        return await exchange(packed)

    appends._exchange = gated  # type: ignore[method-assign]

    def append(task_id: str) -> asyncio.Future[None]:
        command = ("XADD", keys.events(task_id), "*", b"f", b"1", b"v", b"0")
        write = Write.of("append", keys.events(task_id), [command])
        return asyncio.ensure_future(appends.write(write))

    leader = append("x")
    await asyncio.sleep(0)
    others = [append(task_id) for task_id in ("a", "bad", "b")]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(leader, GUARD)
    results = await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), GUARD)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], CorruptDataError) and "WRONGTYPE" in str(results[1])
    for task_id in ("x", "a", "b"):
        assert await redis.xlen(keys.events(task_id)) == 1
    assert len(calls) == (0 if is_cluster(redis) else 2)  # the leader's group, then the rest
    await appends.aclose()


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("state", [TaskState.TASK_STATE_WORKING, TaskState.TASK_STATE_COMPLETED])
def test_a_packed_append_is_append_commands_byte_for_byte(sharded: bool, state: int) -> None:
    """``EntryPacker`` packs event_log's append by hand: the bytes must stay the same."""
    keys = Keys("p", sharded=sharded)
    retention = StreamRetention(maxlen=77, terminal_ttl=12.5, idle_ttl=99.0)
    event = numbered(1, task_id="t:{x}", state=state)
    write = EntryPacker(keys, retention).write("append", "t:{x}", 3, event)
    reference = append_commands(
        keys, "t:{x}", 3, event, terminal=ends_task_stream(event), retention=retention
    )
    packed, expected = Batch(), Batch()
    for count, part, touched in write.parts:
        packed.add_packed(count, part, *touched)
    for command in reference:
        expected.add(command)
    assert packed.packed() == expected.packed()
    assert write.commands() == reference  # what a write sent alone runs
    assert write.key == keys.events("t:{x}")
