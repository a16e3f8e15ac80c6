"""Two SDK request handlers ("replicas" A and B) on one Redis: cluster mode end to end.

Each replica has its own client, ``VersionedRedisTaskStore``, ``RedisTaskEventStream`` and
agent executor instance, as separate processes would (tests/backend/replicas.py). The
agent's pace is set by the test (a gate per step), so "after the first events" is a state,
not a sleep. Timeouts are hang guards only, never asserted bounds.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

import pytest
import redis.asyncio as aioredis
from a2a.helpers.proto_helpers import new_task_from_user_message
from a2a.server.agent_execution import RequestContext
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue_v2 import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.tasks.task_updater import TaskUpdater
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    ListTasksRequest,
    Part,
    Role,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatusUpdateEvent,
)

from a2a_redis.events.event_stream import RedisTaskEventStream
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from tests.backend.replicas import (
    GUARD,
    HandlerReplica,
    Pair,
    ScriptedExecutor,
    Scripts,
    in_process_pair,
)
from tests.helpers import agent_card, ctx, state_of, task_id_of

S = TaskState


class AgentFailure(RuntimeError):
    """What the failing agent raises."""


# --- the agent, paced by the test -------------------------------------------------------


class PacedAgent(ScriptedExecutor):
    """Emits the Task and WORKING, then the script's ``steps`` artifacts, then ends as the
    script says: ``complete`` (COMPLETED), ``input`` (INPUT_REQUIRED) or ``fail`` (raises).
    A follow-up (after input-required) works and completes at once."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        script = self.begin(context)
        assert context.message is not None
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        try:
            if context.current_task is not None:  # a follow-up (after input-required)
                await updater.start_work()
                await updater.complete()
                return
            await event_queue.enqueue_event(new_task_from_user_message(context.message))
            await updater.start_work()
            for i in range(script.steps):
                await script.step()
                await updater.add_artifact(
                    [Part(text=f"{self.name} chunk {i}")], artifact_id=f"a{i}", name=f"chunk-{i}"
                )
            await script.step()
            if script.end == "fail":
                raise AgentFailure("boom")
            if script.end == "input":
                await updater.requires_input()
            else:
                await updater.complete()
        except asyncio.CancelledError:
            script.interrupted.set()
            raise

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task is not None
        self.script_of_task(context.task).cancel_calls.append(self.name)
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        await updater.cancel()


# --- replicas and streams ---------------------------------------------------------------


class RecordingStream(RedisTaskEventStream):
    """Records what the handler publishes and what its subscriptions receive, with versions."""

    def __init__(self, client: aioredis.Redis, *, task_store: VersionedRedisTaskStore) -> None:
        super().__init__(client, task_store=task_store)
        self.published: dict[str, list[VersionedEvent]] = defaultdict(list)
        self.received: dict[str, list[VersionedEvent]] = defaultdict(list)
        self.afters: dict[str, TaskVersion] = {}

    async def publish(self, task_id: str, event: VersionedEvent) -> None:
        self.published[task_id].append(event)
        await super().publish(task_id, event)

    async def subscribe(
        self, task_id: str, *, after: TaskVersion
    ) -> AsyncGenerator[VersionedEvent, None]:
        self.afters[task_id] = after
        async with aclosing(super().subscribe(task_id, after=after)) as subscription:
            async for versioned in subscription:
                self.received[task_id].append(versioned)
                yield versioned


class Replica(HandlerReplica):
    def __init__(self, name: str, url: str, prefix: str, scripts: Scripts) -> None:
        super().__init__(name, url, prefix)
        self.stream = RecordingStream(self.client, task_store=self.store)
        self.agent = PacedAgent(name, scripts)
        self.handler = DefaultRequestHandler(
            agent_executor=self.agent,
            task_store=self.store,
            agent_card=agent_card(),
            event_stream=self.stream,
        )

    async def close(self) -> None:
        await super().close()
        await asyncio.wait_for(self.handler.aclose(), GUARD)
        await self.stream.aclose()
        await self.client.aclose()


Cluster = Pair[Replica]


@pytest.fixture
async def cluster(real_url: str, real_redis: aioredis.Redis, prefix: str) -> AsyncIterator[Cluster]:
    # real_redis: its teardown deletes the prefix's keys, after the replicas are closed.
    async with in_process_pair(Replica, real_url, prefix, Cluster) as pair:
        yield pair


# --- helpers for assertions -------------------------------------------------------------


def check_remote_subscription(origin: Replica, remote: Replica, task_id: str) -> None:
    """The remote subscription's events are exactly the origin's published ones after the
    snapshot's version, in order, with strictly increasing versions."""
    after = remote.stream.afters[task_id]
    received = remote.stream.received[task_id]
    versions = [v.version for v in received]
    for earlier, later in itertools.pairwise(versions):
        assert later.is_after(earlier), versions
    expected = [v for v in origin.stream.published[task_id] if v.version.is_after(after)]
    assert [v.version for v in received] == [v.version for v in expected]
    assert [v.event for v in received] == [v.event for v in expected]


# --- scenarios --------------------------------------------------------------------------


async def test_subscribe_on_b_to_a_task_running_on_a(cluster: Cluster):
    a, b = cluster.a, cluster.b
    key, script = cluster.script(steps=3)
    send = a.send_stream(key)
    head = await send.until(2)  # Task, WORKING; the agent now waits at the gate
    task_id = task_id_of(head)
    assert state_of(head[1]) == S.TASK_STATE_WORKING

    sub = b.subscribe(task_id)
    snapshot = (await sub.until(1))[0]
    script.release(script.steps + 1)
    a_events = await send.finish()
    b_events = await sub.finish()
    assert send.error is None and sub.error is None

    assert isinstance(snapshot, Task)
    assert snapshot.id == task_id
    assert snapshot.status.state == S.TASK_STATE_WORKING
    assert not snapshot.artifacts
    # A's stream: Task, WORKING, 3 artifacts, COMPLETED.
    assert [type(e) for e in a_events] == [
        Task, TaskStatusUpdateEvent, *[TaskArtifactUpdateEvent] * 3, TaskStatusUpdateEvent
    ]  # fmt: skip
    assert state_of(a_events[-1]) == S.TASK_STATE_COMPLETED
    # B: the snapshot, then every later event of A's stream, in order, once each.
    assert b_events[1:] == a_events[2:]
    assert state_of(b_events[-1]) == S.TASK_STATE_COMPLETED
    check_remote_subscription(a, b, task_id)
    assert script.runs == ["A"]
    final = await b.get(task_id)
    assert final.status.state == S.TASK_STATE_COMPLETED
    assert [art.artifact_id for art in final.artifacts] == ["a0", "a1", "a2"]


async def test_cancel_on_b_stops_the_agent_on_a(cluster: Cluster):
    a, b = cluster.a, cluster.b
    key, script = cluster.script(steps=3)
    send = a.send_stream(key)
    task_id = task_id_of(await send.until(2))
    watcher = b.subscribe(task_id)
    await watcher.until(1)

    cancelled = await asyncio.wait_for(
        b.handler.on_cancel_task(CancelTaskRequest(id=task_id), ctx()), GUARD
    )
    assert cancelled is not None
    assert cancelled.status.state == S.TASK_STATE_CANCELED

    # A learns of the cancel on its agent's next write, which the store refuses.
    script.release(1)
    a_events = await send.finish()
    assert send.error is None, send.error
    assert state_of(a_events[-1]) == S.TASK_STATE_CANCELED
    await asyncio.wait_for(script.interrupted.wait(), GUARD)
    assert not any(state_of(e) == S.TASK_STATE_COMPLETED for e in a_events)

    b_events = await watcher.finish()
    assert watcher.error is None, watcher.error
    assert state_of(b_events[-1]) == S.TASK_STATE_CANCELED

    assert (await a.get(task_id)).status.state == S.TASK_STATE_CANCELED
    assert (await b.get(task_id)).status.state == S.TASK_STATE_CANCELED


async def test_input_required_on_a_then_follow_up_on_b(cluster: Cluster):
    a, b = cluster.a, cluster.b
    key, script = cluster.script(steps=0, end="input", paced=False)
    send = a.send_stream(key)
    a_events = await send.finish()
    assert send.error is None, send.error
    assert state_of(a_events[-1]) == S.TASK_STATE_INPUT_REQUIRED
    task = a_events[0]
    assert isinstance(task, Task)
    assert (await b.get(task.id)).status.state == S.TASK_STATE_INPUT_REQUIRED

    follow_up = b.send_stream(key, task_id=task.id, context_id=task.context_id)
    b_events = await follow_up.finish()
    assert follow_up.error is None, follow_up.error
    assert state_of(b_events[-1]) == S.TASK_STATE_COMPLETED
    assert script.runs == ["A", "B"]

    final = await a.get(task.id)
    assert final.status.state == S.TASK_STATE_COMPLETED
    assert final.context_id == task.context_id
    assert [m.role for m in final.history if m.role == Role.ROLE_USER] == [Role.ROLE_USER] * 2
    assert final == await b.get(task.id)


async def test_agent_failure_on_a_is_seen_on_b(cluster: Cluster):
    a, b = cluster.a, cluster.b
    key, script = cluster.script(steps=1, end="fail")
    send = a.send_stream(key)
    task_id = task_id_of(await send.until(2))
    sub = b.subscribe(task_id)
    await sub.until(1)
    script.release(script.steps + 1)

    a_events = await send.finish()
    assert isinstance(send.error, AgentFailure), send.error
    b_events = await sub.finish()
    assert sub.error is None, sub.error
    assert state_of(b_events[-1]) == S.TASK_STATE_FAILED
    assert b_events[1:-1] == a_events[2:]
    assert (await b.get(task_id)).status.state == S.TASK_STATE_FAILED
    assert (await a.get(task_id)).status.state == S.TASK_STATE_FAILED


async def test_get_and_list_agree_across_replicas(cluster: Cluster):
    a, b = cluster.a, cluster.b
    ctx_x, ctx_y = f"x-{uuid.uuid4().hex[:8]}", f"y-{uuid.uuid4().hex[:8]}"
    plan = [  # (replica, context, end, expected state)
        (a, ctx_x, "complete", S.TASK_STATE_COMPLETED),
        (a, ctx_y, "input", S.TASK_STATE_INPUT_REQUIRED),
        (b, ctx_x, "complete", S.TASK_STATE_COMPLETED),
        (b, ctx_y, "fail", S.TASK_STATE_FAILED),
        (b, ctx_x, "input", S.TASK_STATE_INPUT_REQUIRED),
    ]
    expected: dict[str, tuple[str, int]] = {}
    for replica, context_id, end, state in plan:
        key, _ = cluster.script(steps=1, end=end, paced=False)
        tap = replica.send_stream(key, context_id=context_id)
        events = await tap.finish()
        assert isinstance(tap.error, AgentFailure) if end == "fail" else tap.error is None
        expected[task_id_of(events)] = (context_id, state)

    for task_id, (context_id, state) in expected.items():
        on_a, on_b = await a.get(task_id), await b.get(task_id)
        assert on_a == on_b
        assert on_a.status.state == state
        assert on_a.context_id == context_id

    async def both(request: ListTasksRequest, context: ServerCallContext | None = None):
        on_a = await a.handler.on_list_tasks(request, context or ctx())
        on_b = await b.handler.on_list_tasks(request, context or ctx())
        assert on_a == on_b
        return {t.id: (t.context_id, t.status.state) for t in on_a.tasks}

    assert await both(ListTasksRequest()) == expected
    assert await both(ListTasksRequest(include_artifacts=True)) == expected
    for context_id in (ctx_x, ctx_y):
        want = {k: v for k, v in expected.items() if v[0] == context_id}
        assert await both(ListTasksRequest(context_id=context_id)) == want
    want = {k: v for k, v in expected.items() if v[1] == S.TASK_STATE_INPUT_REQUIRED}
    assert await both(ListTasksRequest(status=S.TASK_STATE_INPUT_REQUIRED)) == want
    assert await both(ListTasksRequest(), ctx("bob")) == {}


async def test_fifty_concurrent_tasks_with_remote_subscribers(cluster: Cluster):
    a, b = cluster.a, cluster.b
    steps = 4

    async def one(origin: Replica, remote: Replica) -> None:
        key, script = cluster.script(steps=steps)
        send = origin.send_stream(key)
        task_id = task_id_of(await send.until(2))
        sub = remote.subscribe(task_id)
        # The artifacts race the subscription's start; only the end waits for the snapshot
        # (a subscription to a task already terminal is refused by the SDK).
        script.release(steps)
        snapshot = (await sub.until(1))[0]
        assert isinstance(snapshot, Task)
        script.release(1)
        origin_events = await send.finish()
        remote_events = await sub.finish()
        assert send.error is None, send.error
        assert sub.error is None, sub.error
        assert state_of(origin_events[-1]) == S.TASK_STATE_COMPLETED
        assert state_of(remote_events[-1]) == S.TASK_STATE_COMPLETED
        check_remote_subscription(origin, remote, task_id)
        # The origin's events after those the snapshot already contains.
        assert remote_events[1:] == origin_events[len(origin_events) - len(remote_events) + 1 :]
        assert snapshot.status.state == S.TASK_STATE_WORKING
        remote_artifacts = [e for e in remote_events if isinstance(e, TaskArtifactUpdateEvent)]
        assert len(snapshot.artifacts) + len(remote_artifacts) == steps
        assert script.runs == [origin.name]

    jobs = [one(a, b) for _ in range(25)] + [one(b, a) for _ in range(25)]
    await asyncio.wait_for(asyncio.gather(*jobs), GUARD * 2)
