"""``RedisLegacyRequestHandler`` on two replicas in one process: resubscribe, failure, cancel.

Replicas A and B are two ``RedisBackend``s on one server and prefix (``backend_pair``), each
with its own ``RedisLegacyRequestHandler`` and agent instance. What the agent does is set per
task by a :class:`Plan` (keyed by the message text); a plan that pauses waits for the test's
``go``, so "mid-stream" is a state, not a sleep. Timeouts are hang guards only.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from a2a.helpers.proto_helpers import get_message_text, new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event, EventQueue
from a2a.server.tasks.task_store import TaskStore
from a2a.server.tasks.task_updater import TaskUpdater
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    ListTasksResponse,
    Part,
    SubscribeToTaskRequest,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatusUpdateEvent,
)
from a2a.utils.errors import TaskNotFoundError

from a2a_redis import RedisBackend
from a2a_redis.handlers.legacy import RedisLegacyRequestHandler
from tests.helpers import (
    Tap,
    agent_card,
    backend_pair,
    background_settled,
    ctx,
    eventually,
    send_request,
    state_of,
    task_id_of,
)

S = TaskState
GUARD = 30.0  # seconds: a hang guard only
IDLE = {"queues": 0, "leases": 0, "taps": 0}


class AgentFailure(RuntimeError):
    """What a failing agent raises (its text must reach no client)."""


@dataclass
class Plan:
    """One task's agent: ``chunks`` chunks (None: until stopped or cancelled), waiting for
    ``go`` before chunk ``pause_at`` (``pause_at == chunks``: before the end), then COMPLETED,
    or raising ``AgentFailure`` if ``fail``."""

    chunks: int | None = 3
    pause_at: int | None = None
    fail: bool = False
    fail_first: bool = False  # raise before any event
    go: asyncio.Event = field(default_factory=asyncio.Event)
    stop: bool = False  # teardown: end a plan without end
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # execute() has returned
    runs: list[str] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)


class PlanAgent(AgentExecutor):
    def __init__(self, name: str, plans: dict[str, Plan]) -> None:
        self.name = name
        self.plans = plans
        self.by_task: dict[str, Plan] = {}

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None and context.task_id and context.context_id
        plan = self.plans[get_message_text(context.message)]
        self.by_task[context.task_id] = plan
        plan.runs.append(self.name)
        plan.task_ids.append(context.task_id)
        try:
            if plan.fail_first:
                raise AgentFailure("secret-detail-7")
            updater = TaskUpdater(event_queue, context.task_id, context.context_id)
            await event_queue.enqueue_event(new_task_from_user_message(context.message))
            await updater.start_work()
            i = 0
            while (plan.chunks is None or i < plan.chunks) and not plan.stop:
                if i == plan.pause_at:
                    await plan.go.wait()
                await updater.add_artifact(
                    [Part(text=f"chunk {i}")], artifact_id="answer", name="answer", append=i > 0
                )
                i += 1
                await asyncio.sleep(0)
            if plan.pause_at is not None and plan.pause_at == plan.chunks:
                await plan.go.wait()
            if plan.fail:
                raise AgentFailure("secret-detail-7")
            await updater.complete()
        finally:
            plan.gone.set()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id and context.context_id
        self.by_task[context.task_id].cancels.append(self.name)
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


@dataclass
class Replica:
    name: str
    backend: RedisBackend
    handler: RedisLegacyRequestHandler
    taps: list[Tap] = field(default_factory=list)

    def send_stream(self, key: str, owner: str = "alice") -> Tap:
        return self._follow(self.handler.on_message_send_stream(send_request(key), ctx(owner)))

    def subscribe(self, task_id: str) -> Tap:
        request = SubscribeToTaskRequest(id=task_id)
        return self._follow(self.handler.on_subscribe_to_task(request, ctx()))

    def _follow(self, events: AsyncIterator[Event]) -> Tap:
        tap = Tap(events)  # type: ignore[arg-type]
        self.taps.append(tap)
        return tap

    async def get(self, task_id: str) -> Task:
        task = await self.handler.on_get_task(GetTaskRequest(id=task_id), ctx())
        assert task is not None
        return task

    async def stored(self, task_id: str) -> Task:
        task = await self.backend.plain_task_store.get(task_id, ctx())
        assert task is not None
        return task

    async def settled(self) -> None:
        """Every deferred cleanup done, and no queue, lease or tap left on this replica."""

        async def idle() -> bool:
            await background_settled(self.handler)
            return self.backend.queue_manager.stats() == IDLE and len(self.backend.leases) == 0

        await eventually(idle, timeout=GUARD, what=f"replica {self.name} idle")


@dataclass
class Replicas:
    a: Replica
    b: Replica
    plans: dict[str, Plan]

    def plan(self, **kwargs: object) -> tuple[str, Plan]:
        key = f"job-{uuid.uuid4().hex[:10]}"
        self.plans[key] = Plan(**kwargs)  # type: ignore[arg-type]
        return key, self.plans[key]

    async def settled(self) -> None:
        await self.a.settled()
        await self.b.settled()


class RefusingStore(TaskStore):
    """The plain store, refusing every save of the tasks in ``refused`` (as a store that
    keeps a terminal state another replica wrote refuses to overwrite it)."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self.refused: set[str] = set()

    async def save(self, task: Task, context: ServerCallContext) -> None:
        if task.id in self.refused:
            raise AgentFailure(f"refused to overwrite task {task.id}")
        await self.store.save(task, context)

    async def get(self, task_id: str, context: ServerCallContext) -> Task | None:
        return await self.store.get(task_id, context)

    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        return await self.store.list(params, context)

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        await self.store.delete(task_id, context)


def replica(
    name: str, backend: RedisBackend, plans: dict[str, Plan], store: TaskStore | None = None
) -> Replica:
    handler = RedisLegacyRequestHandler(
        agent_executor=PlanAgent(name, plans),
        task_store=store or backend.plain_task_store,
        agent_card=agent_card(),
        queue_manager=backend.queue_manager,
        push_config_store=backend.push_config_store,
    )
    return Replica(name, backend, handler)


@pytest.fixture
async def pair(real_url: str, prefix: str) -> AsyncIterator[Replicas]:
    plans: dict[str, Plan] = {}
    async with backend_pair(real_url, prefix) as (a, b):
        replicas = Replicas(replica("A", a, plans), replica("B", b, plans), plans)
        try:
            yield replicas
        finally:
            for plan in plans.values():  # let every agent end (after a failed test)
                plan.stop = True
                plan.go.set()
            for r in (replicas.a, replicas.b):
                for tap in r.taps:
                    await tap.close()
            await asyncio.wait_for(replicas.settled(), GUARD)


def chunks_of(events: list[Event]) -> list[str]:
    """The chunk texts of a stream: a Task's artifacts, then each artifact update's."""
    out: list[str] = []
    for event in events:
        if isinstance(event, Task):
            out += [p.text for a in event.artifacts for p in a.parts]
        elif isinstance(event, TaskArtifactUpdateEvent):
            out += [p.text for p in event.artifact.parts]
    return out


def expected(n: int) -> list[str]:
    return [f"chunk {i}" for i in range(n)]


# --- 1. resubscribe never writes --------------------------------------------------------


async def test_resubscribe_on_b_while_a_streams_200_chunks_stores_each_chunk_once(
    pair: Replicas,
):
    a, b = pair.a, pair.b
    key, plan = pair.plan(chunks=200, pause_at=50)
    send = a.send_stream(key)
    # Task, WORKING, 50 chunks: A's stream yields an event after storing it.
    task_id = task_id_of(await send.until(2 + 50))
    sub = b.subscribe(task_id)
    snapshot = (await sub.until(1))[0]  # B's tap is open before it yields the snapshot
    plan.go.set()
    a_events, b_events = await asyncio.gather(send.finish(), sub.finish())

    assert (send.error, sub.error) == (None, None)
    assert chunks_of(a_events) == expected(200)
    assert state_of(a_events[-1]) == S.TASK_STATE_COMPLETED
    assert isinstance(snapshot, Task) and snapshot.status.state == S.TASK_STATE_WORKING
    assert chunks_of([snapshot]) == expected(50)
    assert b_events[1:] == a_events[2 + 50 :]  # every later event, in order, once
    assert chunks_of(b_events) == expected(200)
    assert state_of(b_events[-1]) == S.TASK_STATE_COMPLETED
    assert plan.runs == ["A"]
    await pair.settled()
    for r in (a, b):
        stored = await r.stored(task_id)
        assert stored.status.state == S.TASK_STATE_COMPLETED
        assert chunks_of([stored]) == expected(200)  # each chunk once: only A wrote


# --- 2. an agent that raises ends its task FAILED ---------------------------------------


async def test_agent_raising_on_a_ends_both_streams_with_failed_and_releases_the_lease(
    pair: Replicas,
):
    a, b = pair.a, pair.b
    key, plan = pair.plan(chunks=3, pause_at=3, fail=True)
    send = a.send_stream(key)
    task_id = task_id_of(await send.until(2 + 3))
    sub = b.subscribe(task_id)
    await sub.until(1)
    plan.go.set()
    a_events, b_events = await asyncio.gather(send.finish(), sub.finish())

    for events, error in ((a_events, send.error), (b_events, sub.error)):
        assert error is None  # the stream ends cleanly, after FAILED
        last = events[-1]
        assert isinstance(last, TaskStatusUpdateEvent)
        assert last.status.state == S.TASK_STATE_FAILED
        text = last.status.message.parts[0].text
        assert "AgentFailure" in text and "secret" not in text
    assert [state_of(e) for e in b_events[1:]] == [S.TASK_STATE_FAILED]
    await pair.settled()  # no queue, lease or tap left on either replica
    for r in (a, b):
        assert (await r.get(task_id)).status.state == S.TASK_STATE_FAILED
        assert chunks_of([await r.stored(task_id)]) == expected(3)
        assert await r.backend.redis.exists(r.backend.task_store.keys.lease(task_id)) == 0


async def test_agent_raising_on_a_blocking_send_returns_the_failed_task(pair: Replicas):
    a, b = pair.a, pair.b
    key, _ = pair.plan(chunks=2, fail=True)
    result = await asyncio.wait_for(a.handler.on_message_send(send_request(key), ctx()), GUARD)
    assert isinstance(result, Task)
    assert result.status.state == S.TASK_STATE_FAILED
    await pair.settled()
    assert (await b.get(result.id)).status.state == S.TASK_STATE_FAILED


async def test_agent_raising_before_any_event_leaves_a_failed_task(pair: Replicas):
    a, b = pair.a, pair.b
    key, _ = pair.plan(fail_first=True)
    send = a.send_stream(key)
    events = await send.finish()
    assert send.error is None
    assert [type(e) for e in events] == [TaskStatusUpdateEvent]
    assert state_of(events[0]) == S.TASK_STATE_FAILED
    task_id = events[0].task_id  # type: ignore[union-attr]
    await pair.settled()
    stored = await b.get(task_id)
    assert stored.status.state == S.TASK_STATE_FAILED
    assert [m.parts[0].text for m in stored.history] == [key]  # the user's message


# --- 3. a local cancel ends the sender's stream with CANCELED ----------------------------


@pytest.mark.parametrize("round_", range(10))
async def test_local_cancel_during_fast_chunks_ends_the_stream_and_stays_canceled(
    pair: Replicas, round_: int
):
    a, b = pair.a, pair.b
    key, plan = pair.plan(chunks=None)
    send = a.send_stream(key)
    task_id = task_id_of(await send.until(2 + 1 + round_))
    sub = b.subscribe(task_id)
    await sub.until(1)
    cancel = a.handler.on_cancel_task(CancelTaskRequest(id=task_id), ctx())
    result, a_events, b_events = await asyncio.gather(cancel, send.finish(), sub.finish())

    assert result is not None and result.status.state == S.TASK_STATE_CANCELED
    assert (send.error, sub.error) == (None, None)
    assert state_of(a_events[-1]) == S.TASK_STATE_CANCELED  # nothing after it
    assert all(isinstance(e, TaskArtifactUpdateEvent) for e in a_events[2:-1])
    assert state_of(b_events[-1]) == S.TASK_STATE_CANCELED
    assert plan.cancels == ["A"]
    await asyncio.wait_for(plan.gone.wait(), GUARD)  # the agent is gone
    await pair.settled()
    sent = chunks_of(a_events)
    assert sent == expected(len(sent))
    for r in (a, b):
        stored = await r.stored(task_id)
        assert stored.status.state == S.TASK_STATE_CANCELED
        assert chunks_of([stored]) == sent  # every chunk the sender got, nothing later
    assert chunks_of([result]) == sent


async def test_cancel_of_another_owner_is_not_found_and_leaves_the_agent_running(
    pair: Replicas,
):
    a = pair.a
    key, plan = pair.plan(chunks=1, pause_at=1)
    send = a.send_stream(key)
    task_id = task_id_of(await send.until(3))
    with pytest.raises(TaskNotFoundError):
        await a.handler.on_cancel_task(CancelTaskRequest(id=task_id), ctx("mallory"))
    assert a.handler.runs(task_id)
    plan.go.set()
    events = await send.finish()
    assert state_of(events[-1]) == S.TASK_STATE_COMPLETED
    assert plan.cancels == []


async def test_cancel_answers_with_the_record_when_the_consumer_cannot_store(pair: Replicas):
    # Another writer stored CANCELED, and the store refuses the sender's consumer from then
    # on: the consumer fails (its stream with it) and stores nothing more, yet the cancel
    # answers, with the stored CANCELED, and stops the agent.
    a = pair.a
    store = RefusingStore(a.backend.plain_task_store)
    a.handler = replica("A", a.backend, pair.plans, store).handler
    key, plan = pair.plan(chunks=None)
    send = a.send_stream(key)
    task_id = task_id_of(await send.until(4))
    store.refused.add(task_id)
    task = await a.stored(task_id)
    task.status.state = S.TASK_STATE_CANCELED
    await a.backend.plain_task_store.save(task, ctx())
    result, _ = await asyncio.gather(
        a.handler.on_cancel_task(CancelTaskRequest(id=task_id), ctx()), send.finish()
    )
    assert result is not None and result.status.state == S.TASK_STATE_CANCELED
    await asyncio.wait_for(plan.gone.wait(), GUARD)
    assert isinstance(send.error, AgentFailure)
    assert (await a.stored(task_id)).status.state == S.TASK_STATE_CANCELED


async def test_concurrent_cancels_of_a_blocking_send_share_one_cancel(pair: Replicas):
    a = pair.a
    key, plan = pair.plan(chunks=None)
    blocking = asyncio.create_task(a.handler.on_message_send(send_request(key), ctx()))
    await eventually(lambda: plan.task_ids, what="the agent runs")
    task_id = plan.task_ids[0]
    store = a.backend.plain_task_store
    await eventually(lambda: store.get(task_id, ctx()), what="the task is stored")
    request = CancelTaskRequest(id=task_id)
    results = await asyncio.gather(
        a.handler.on_cancel_task(request, ctx()),
        a.handler.on_cancel_task(request, ctx()),
        a.handler.cancel_here(task_id),
        blocking,
    )
    for result in results:
        assert isinstance(result, Task) and result.status.state == S.TASK_STATE_CANCELED
    assert plan.cancels == ["A"]  # one AgentExecutor.cancel
    await asyncio.wait_for(plan.gone.wait(), GUARD)
    await pair.settled()
    stored = await a.stored(task_id)
    assert stored.status.state == S.TASK_STATE_CANCELED
    assert chunks_of([stored]) == chunks_of([results[-1]])


# --- 4. cancel_here: the control plane's hook ---------------------------------------------


async def test_cancel_here_cancels_only_where_the_agent_runs(pair: Replicas):
    a, b = pair.a, pair.b
    assert await a.handler.cancel_here("no-such-task") is None
    key, plan = pair.plan(chunks=None)
    send = a.send_stream(key, owner="bob")  # cancel_here uses the starting request's context
    task_id = task_id_of(await send.until(4))
    assert a.handler.runs(task_id) and not b.handler.runs(task_id)
    assert await b.handler.cancel_here(task_id) is None

    result, events = await asyncio.gather(a.handler.cancel_here(task_id), send.finish())
    assert result is not None and result.id == task_id
    assert result.status.state == S.TASK_STATE_CANCELED
    assert send.error is None and state_of(events[-1]) == S.TASK_STATE_CANCELED
    assert plan.cancels == ["A"]
    await asyncio.wait_for(plan.gone.wait(), GUARD)
    await pair.settled()
    assert not a.handler.runs(task_id)
    assert await a.handler.cancel_here(task_id) is None
    stored = await b.backend.plain_task_store.get(task_id, ctx("bob"))
    assert stored is not None and stored.status.state == S.TASK_STATE_CANCELED
    assert chunks_of([stored]) == chunks_of(events)
