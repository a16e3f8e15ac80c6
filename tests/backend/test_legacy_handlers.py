"""The legacy handler on a2a-redis (``RedisTaskStore`` + ``RedisQueueManager``), 2 replicas.

In one process: two ``RedisLegacyRequestHandler`` ("A" and "B"), each with its own client,
``RedisTaskStore``, ``RedisQueueManager`` and agent executor instance, on one prefix; the
agent's pace is set by the test (a gate per step). Two real processes:
``examples/agent_server.py --legacy`` twice on loopback (the SDK's ``LegacyRequestHandler``,
as ``RedisBackend.request_handler(legacy=True)`` builds it), driven by the official client.
Timeouts are hang guards only, never asserted bounds.

``on_subscribe_to_task`` reads the stored task, then taps the queue (the SDK's handler taps
only after yielding the task): an event written between the read and the tap reaches
neither the snapshot nor the tap (so it is with ``InMemoryQueueManager`` too). The in-process
tests therefore let the agent go on only once B's tap is open (B's queue manager records
it), so "no gap" is a property of ours, not luck.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from a2a.helpers.proto_helpers import new_task_from_user_message
from a2a.server.agent_execution import RequestContext
from a2a.server.events.event_queue import Event, EventQueue, EventQueueLegacy
from a2a.server.tasks.task_updater import TaskUpdater
from a2a.types import (
    GetTaskRequest,
    Message,
    Part,
    StreamResponse,
    SubscribeToTaskRequest,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatusUpdateEvent,
)

from a2a_redis.events.orphans import LOST_REPLICA_TEXT
from a2a_redis.events.queue_manager import RedisQueueManager
from a2a_redis.handlers.legacy import RedisLegacyRequestHandler
from tests.backend.replicas import (
    GUARD,
    HandlerReplica,
    Pair,
    Script,
    ScriptedExecutor,
    Scripts,
    in_process_pair,
)
from tests.helpers import (
    ROOT,
    ReplicaProcess,
    Tap,
    agent_card,
    background_settled,
    chunks,
    ctx,
    final_state,
    replica_pair,
    send_request,
    start_stream,
    state_of,
    subscribe_live,
    task_id_of,
)

S = TaskState
OWNER_LOST_GUARD = 40.0  # seconds: hang guard for a tap whose owner died (default lease 10 s)
IDLE = {"queues": 0, "leases": 0, "taps": 0}


def chunk(replica: str, i: int) -> str:
    return f"chunk {i} from {replica}"


# --- the agent, paced by the test -------------------------------------------------------


class ChunkAgent(ScriptedExecutor):
    """Emits the Task and WORKING, then the script's ``steps`` chunks appended to one
    artifact, then COMPLETED."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        script = self.begin(context)
        assert context.message is not None
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        await event_queue.enqueue_event(new_task_from_user_message(context.message))
        await updater.start_work()
        for i in range(script.steps):
            await script.step()
            await updater.add_artifact(
                [Part(text=chunk(self.name, i))], artifact_id="answer", name="answer",
                append=i > 0,
            )  # fmt: skip
        await script.step()
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise AssertionError("not used by these tests")


# --- replicas and streams ---------------------------------------------------------------


class TrackingQueueManager(RedisQueueManager):
    """Notes when ``tap`` returned, so the test knows the subscription's start is fixed."""

    def __init__(self, client: aioredis.Redis, *, prefix: str) -> None:
        super().__init__(client, prefix=prefix)
        self.tapped: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def tap(self, task_id: str) -> EventQueueLegacy | None:
        queue = await super().tap(task_id)
        self.tapped[task_id].set()
        return queue

    async def wait_tapped(self, task_id: str) -> None:
        await asyncio.wait_for(self.tapped[task_id].wait(), GUARD)


class Stream(Tap):
    """A handler stream that must end without error."""

    async def finish(self) -> list[Event]:
        events = await super().finish()
        assert self.error is None, self.error
        return events


class LegacyReplica(HandlerReplica):
    tap_type = Stream

    def __init__(self, name: str, url: str, prefix: str, scripts: Scripts) -> None:
        super().__init__(name, url, prefix)
        self.queues = TrackingQueueManager(self.client, prefix=prefix)
        self.handler = RedisLegacyRequestHandler(
            agent_executor=ChunkAgent(name, scripts),
            task_store=self.store.as_task_store,
            agent_card=agent_card(),
            queue_manager=self.queues,
        )

    async def send(self, key: str) -> Task | Message:
        return await asyncio.wait_for(self.handler.on_message_send(send_request(key), ctx()), GUARD)

    async def settled(self) -> None:
        """Wait for the handler's background cleanups, then for every queue, lease and tap
        of this replica to be gone (a remote tap ends a moment after its consumer closed it).
        """

        async def wait() -> None:
            while True:
                await background_settled(self.handler)
                if self.queues.stats() == IDLE:
                    return
                await asyncio.sleep(0.01)

        await asyncio.wait_for(wait(), GUARD)

    async def close(self) -> None:
        await super().close()
        await self.settled()
        await self.queues.aclose()
        await self.client.aclose()


class Cluster(Pair[LegacyReplica]):
    async def settled(self) -> None:
        await self.a.settled()
        await self.b.settled()


@pytest.fixture
async def cluster(real_url: str, real_redis: aioredis.Redis, prefix: str) -> AsyncIterator[Cluster]:
    # real_redis: its teardown deletes the prefix's keys, after the replicas are closed.
    async with in_process_pair(LegacyReplica, real_url, prefix, Cluster) as pair:
        yield pair


# --- helpers for assertions -------------------------------------------------------------


def chunks_of(events: list[Event]) -> list[str]:
    """The chunk texts a stream carries: a Task's artifacts, then each artifact update's."""
    out: list[str] = []
    for event in events:
        if isinstance(event, Task):
            out += [p.text for a in event.artifacts for p in a.parts]
        elif isinstance(event, TaskArtifactUpdateEvent):
            out += [p.text for p in event.artifact.parts]
    return out


async def until_stored(replica: LegacyReplica, task_id: str, state: int) -> None:
    """Wait until ``replica`` reads ``task_id`` from the store in ``state``."""

    async def wait() -> None:
        while True:
            task = await replica.store.as_task_store.get(task_id, ctx())
            if task is not None and task.status.state == state:
                return
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), GUARD)


async def subscribe_mid_stream(
    cluster: Cluster, key: str, script: Script, sent_first: int
) -> tuple[Stream, Stream, Task]:
    """Start ``key`` on A, let ``sent_first`` chunks out, then subscribe on B; return the
    send, the subscription (once its tap is open) and B's snapshot. The agent then waits
    at its gate for the rest."""
    a, b = cluster.a, cluster.b
    send = a.send_stream(key)
    task_id = task_id_of(await send.until(2))  # Task, WORKING
    script.release(sent_first)
    # A's stream yields an event after saving it: the store now holds these chunks.
    await send.until(2 + sent_first)
    sub = b.subscribe(task_id)
    snapshot = (await sub.until(1))[0]
    assert isinstance(snapshot, Task), snapshot
    await b.queues.wait_tapped(task_id)
    return send, sub, snapshot


# --- in one process ---------------------------------------------------------------------


async def test_resubscribe_on_b_mid_stream_gets_every_later_event(cluster: Cluster):
    a, b = cluster.a, cluster.b
    key, script = cluster.script(steps=6)
    send, sub, snapshot = await subscribe_mid_stream(cluster, key, script, sent_first=2)
    script.release(script.steps - 2 + 1)
    a_events = await send.finish()
    b_events = await sub.finish()

    expected = [chunk("A", i) for i in range(6)]
    # A's stream: Task, WORKING, 6 chunks, COMPLETED.
    assert [type(e) for e in a_events] == [
        Task, TaskStatusUpdateEvent, *[TaskArtifactUpdateEvent] * 6, TaskStatusUpdateEvent
    ]  # fmt: skip
    assert chunks_of(a_events) == expected
    assert state_of(a_events[-1]) == S.TASK_STATE_COMPLETED
    # B: the stored task first (with the chunks sent so far), then every later event of
    # A's stream, in order, once each, through COMPLETED.
    assert snapshot.status.state == S.TASK_STATE_WORKING
    assert chunks_of([snapshot]) == expected[:2]
    assert b_events[1:] == a_events[4:]
    assert chunks_of(b_events) == expected  # snapshot + later chunks: no gap, no duplicate
    assert state_of(b_events[-1]) == S.TASK_STATE_COMPLETED
    assert script.runs == ["A"]

    for replica in (a, b):  # what each chunk became in the store: see the next test
        assert (await replica.get(snapshot.id)).status.state == S.TASK_STATE_COMPLETED
    await cluster.settled()


# The SDK's LegacyRequestHandler failed this: its resubscribe on B saved the task too, from a
# copy loaded at B's first live event, re-appending that chunk. RedisLegacyRequestHandler's
# resubscribe does not write.
async def test_stored_task_after_a_remote_resubscribe_keeps_each_chunk_once(cluster: Cluster):
    a, b = cluster.a, cluster.b
    key, script = cluster.script(steps=6)
    send, sub, snapshot = await subscribe_mid_stream(cluster, key, script, sent_first=2)
    script.release(script.steps - 2 + 1)
    await send.finish()
    await sub.finish()
    await cluster.settled()
    expected = [chunk("A", i) for i in range(6)]
    for replica in (a, b):
        final = await replica.get(snapshot.id)
        assert final.status.state == S.TASK_STATE_COMPLETED
        assert chunks_of([final]) == expected


async def test_blocking_send_returns_the_final_task(cluster: Cluster):
    a, b = cluster.a, cluster.b
    key, script = cluster.script(steps=5, paced=False)
    result = await a.send(key)

    expected = [chunk("A", i) for i in range(5)]
    assert isinstance(result, Task), result
    assert result.status.state == S.TASK_STATE_COMPLETED  # not SUBMITTED, not WORKING
    assert [art.artifact_id for art in result.artifacts] == ["answer"]
    assert chunks_of([result]) == expected
    assert script.runs == ["A"]
    stored = await b.get(result.id)
    assert stored.status.state == S.TASK_STATE_COMPLETED
    assert chunks_of([stored]) == expected
    await cluster.settled()


async def test_blocking_send_on_a_while_b_is_subscribed(cluster: Cluster):
    a, b = cluster.a, cluster.b
    key, script = cluster.script(steps=4)
    blocking = asyncio.create_task(a.send(key))
    # The blocking call returns nothing before the end: the agent tells the task id, and
    # B can subscribe once A's consumer has stored the task (WORKING, at the first gate).
    task_id = await asyncio.wait_for(script.task_ids.get(), GUARD)
    await until_stored(b, task_id, S.TASK_STATE_WORKING)
    sub = b.subscribe(task_id)
    await sub.until(1)
    await b.queues.wait_tapped(task_id)
    script.release(script.steps + 1)
    result = await asyncio.wait_for(blocking, GUARD)
    b_events = await sub.finish()

    expected = [chunk("A", i) for i in range(4)]
    assert isinstance(result, Task), result
    assert result.status.state == S.TASK_STATE_COMPLETED
    assert chunks_of([result]) == expected
    assert chunks_of(b_events) == expected
    assert state_of(b_events[-1]) == S.TASK_STATE_COMPLETED
    await cluster.settled()


async def test_fifty_concurrent_tasks_each_resubscribed_on_b(cluster: Cluster):
    steps = 4

    async def one() -> None:
        key, script = cluster.script(steps=steps)
        send, sub, snapshot = await subscribe_mid_stream(cluster, key, script, sent_first=1)
        script.release(steps - 1 + 1)
        a_events = await send.finish()
        b_events = await sub.finish()
        expected = [chunk("A", i) for i in range(steps)]
        assert chunks_of(a_events) == expected
        assert state_of(a_events[-1]) == S.TASK_STATE_COMPLETED
        assert chunks_of([snapshot]) == expected[:1]
        assert b_events[1:] == a_events[3:]
        assert chunks_of(b_events) == expected
        assert state_of(b_events[-1]) == S.TASK_STATE_COMPLETED
        assert script.runs == ["A"]

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(50))), GUARD * 2)
    await cluster.settled()


# --- two real processes -----------------------------------------------------------------

# ``--lease-ttl`` (both replicas: a tap's silence bound is the tapping replica's lease_ttl)
# is used once examples/agent_server.py accepts it; until then, the default 10 s lease.
LEASE_TTL_ARGS = (
    ["--lease-ttl", "2"]
    if "--lease-ttl" in (ROOT / "examples" / "agent_server.py").read_text()
    else []
)


@pytest.fixture
def replicas(
    real_url: str, real_redis: object, prefix: str
) -> Iterator[tuple[ReplicaProcess, ReplicaProcess]]:
    # 1 s between chunks: B subscribes right after A's client saw a chunk, far from the
    # next one, so the SDK's snapshot-then-tap window (module docstring) holds no event.
    # That window is in B's process, where the test cannot see it close: this margin (B
    # reads the task, then takes the tap: a few round trips) is all a loaded machine has.
    with replica_pair(real_url, prefix, 1.0, "--legacy", *LEASE_TTL_ARGS) as pair:
        yield pair


async def test_processes_resubscribe_on_b_mid_stream_gets_every_later_event(clients):
    a, b = clients
    task_id, seen_a, runner = await start_stream(a, "chunks=4")
    subscription = b.subscribe(SubscribeToTaskRequest(id=task_id))

    async def collect() -> list[StreamResponse]:
        return [r async for r in subscription]

    seen_b = await asyncio.wait_for(collect(), GUARD)
    await asyncio.wait_for(runner, GUARD)

    expected = [chunk("A", i) for i in range(4)]
    assert chunks(seen_a) == expected
    assert final_state(seen_a) == S.TASK_STATE_COMPLETED
    assert seen_b[0].HasField("task")  # the stored task first
    assert seen_b[0].task.status.state == S.TASK_STATE_WORKING
    assert 1 <= len(chunks(seen_b[:1])) < 4  # subscribed mid-stream
    assert chunks(seen_b) == expected  # snapshot + later chunks: no gap, no duplicate
    assert final_state(seen_b) == S.TASK_STATE_COMPLETED
    for client in (a, b):
        task = await client.get_task(GetTaskRequest(id=task_id))
        assert task.status.state == S.TASK_STATE_COMPLETED


async def test_processes_owner_killed_ends_the_resubscription_on_b_with_failed(replicas, clients):
    replica_a, _ = replicas
    a, b = clients
    task_id, _, runner_a = await start_stream(a, "chunks=200")
    seen_b, runner_b = await subscribe_live(b, task_id, read_timeout=OWNER_LOST_GUARD, guard=GUARD)

    replica_a.kill()
    await asyncio.gather(runner_a, return_exceptions=True)  # A's own stream breaks
    # B's stream ends, cleanly, with FAILED: B's reaper sees A's lapsed heartbeat and ends
    # A's running task (orphan_policy "fail", the default), before B's tap gives up.
    await asyncio.wait_for(runner_b, OWNER_LOST_GUARD)

    got = chunks(seen_b)
    assert seen_b[0].HasField("task")
    assert 2 <= len(got) < 200
    assert got == [chunk("A", i) for i in range(len(got))]  # in order, no gap, no duplicate
    assert final_state(seen_b) == S.TASK_STATE_FAILED
    last = seen_b[-1].status_update.status
    assert last.message.parts[0].text == LOST_REPLICA_TEXT
    stored = await b.get_task(GetTaskRequest(id=task_id))
    assert stored.status.state == S.TASK_STATE_FAILED
    kept = chunks([StreamResponse(task=stored)])  # what A saved before it died, once each
    assert kept == got[: len(kept)]
