"""Load: concurrent streaming tasks on replica A, each followed twice on replica B.

Two in-process ``DefaultRequestHandler`` replicas, each over its own ``RedisBackend``, on a
private embedded server. Every task is started on A and paused (its agent waits at a
gate) until both of its subscribers on B are live; then every gate opens at once. Each
stream must hold every event once, in order; afterwards nothing may be left behind:
listener feeds and subscribers, leases, pub/sub channels, the SDK's active tasks, and
Python objects (counted after a warm-up round, compared with a second round).

``make test`` runs one round of 1,000 tasks with 2,000 subscribers, and the memory check
(a warm-up round, then one more) with 200 tasks; the memory check over four rounds of
1,000 tasks is marked ``soak`` (``make soak``). Timeouts are hang guards only.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from a2a.helpers.proto_helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events.event_queue_v2 import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.tasks.task_updater import TaskUpdater
from a2a.types.a2a_pb2 import (
    Part,
    SubscribeToTaskRequest,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatusUpdateEvent,
)

from a2a_redis import RedisBackend
from a2a_redis.log.keys import clear_id_cache
from a2a_redis.ops.embedded import EmbeddedServer
from tests.helpers import Tap, agent_card, channels_under, ctx, send_request, state_of, task_id_of

S = TaskState
STEPS = 3  # artifacts per task
GUARD = 300.0  # seconds: a hang guard only


class GatedAgent(AgentExecutor):
    """Task, WORKING, then (once the task's gate opens) STEPS artifacts and COMPLETED."""

    def __init__(self) -> None:
        self.gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None
        task_id = str(context.task_id)
        updater = TaskUpdater(event_queue, task_id, str(context.context_id))
        await event_queue.enqueue_event(new_task_from_user_message(context.message))
        await updater.start_work()
        await self.gates[task_id].wait()
        for i in range(STEPS):
            await updater.add_artifact([Part(text=f"part {i}")], artifact_id=f"a{i}")
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise AssertionError("nothing is cancelled here")


@dataclass
class Replica:
    backend: RedisBackend
    handler: DefaultRequestHandler
    agent: GatedAgent


@pytest.fixture
async def replicas(
    private_server: EmbeddedServer, prefix: str
) -> AsyncIterator[tuple[Replica, Replica, aioredis.Redis]]:
    made = []
    for _ in range(2):
        backend = RedisBackend.from_url(private_server.url, prefix=prefix)
        agent = GatedAgent()
        made.append(Replica(backend, backend.request_handler(agent, agent_card()), agent))  # type: ignore[arg-type]
    admin = aioredis.Redis.from_url(private_server.url)
    try:
        yield made[0], made[1], admin
    finally:
        for replica in made:
            await replica.handler.aclose()  # type: ignore[attr-defined]
            await replica.backend.aclose()
        await admin.aclose()


def artifact_ids(events: list) -> list[str]:
    return [e.artifact.artifact_id for e in events if isinstance(e, TaskArtifactUpdateEvent)]


async def until(check, what: str, guard: float = GUARD) -> None:
    """Wait (bounded) until ``check()`` holds."""
    for _ in range(int(guard * 20)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never reached: {what}")


async def one_round(a: Replica, b: Replica, tasks: int) -> None:
    """``tasks`` streaming tasks on A, two subscribers each on B; all checked."""

    async def start() -> Tap:
        sender = Tap(a.handler.on_message_send_stream(send_request("go"), ctx()))
        sender.guard = GUARD
        await sender.until(2)  # the Task and WORKING: stored; the agent waits at its gate
        return sender

    senders = await asyncio.gather(*(start() for _ in range(tasks)))
    ids = [task_id_of(sender.events) for sender in senders]
    subscribers = [
        Tap(b.handler.on_subscribe_to_task(SubscribeToTaskRequest(id=task_id), ctx()))
        for task_id in ids
        for _ in range(2)
    ]
    for tap in subscribers:
        tap.guard = GUARD

    async def all_live() -> bool:  # every subscriber follows its task's feed on B
        return b.backend.listener.stats()["subscribers"] == 2 * tasks

    await until(all_live, "all subscribers live")
    assert b.backend.listener.stats()["tasks"] == tasks  # one feed per task, shared by two
    for task_id in ids:
        a.agent.gates[task_id].set()
    await asyncio.wait_for(asyncio.gather(*(t.finish() for t in [*senders, *subscribers])), GUARD)

    expected = [f"a{i}" for i in range(STEPS)]
    for sender in senders:
        events = sender.events
        assert sender.error is None
        assert [type(e) for e in events] == [
            Task, TaskStatusUpdateEvent, *[TaskArtifactUpdateEvent] * STEPS, TaskStatusUpdateEvent
        ]  # fmt: skip
        assert artifact_ids(events) == expected
        assert state_of(events[-1]) == S.TASK_STATE_COMPLETED
    for n, tap in enumerate(subscribers):
        events = tap.events
        assert tap.error is None, tap.error
        assert events[0].id == ids[n // 2]  # type: ignore[union-attr]
        assert state_of(events[0]) == S.TASK_STATE_WORKING  # the snapshot
        assert [type(e) for e in events[1:]] == [
            *[TaskArtifactUpdateEvent] * STEPS,
            TaskStatusUpdateEvent,
        ]  # every later event once, in order
        assert artifact_ids(events) == expected
        assert state_of(events[-1]) == S.TASK_STATE_COMPLETED
    for replica in (a, b):
        replica.agent.gates.clear()


async def check_released(a: Replica, b: Replica, admin: aioredis.Redis, prefix: str) -> None:
    """Nothing of the round is left: feeds, subscribers, leases, channels, active tasks."""

    async def idle() -> bool:
        for replica in (a, b):
            health = await replica.backend.health()
            if (
                health["listener"]["tasks"]
                or health["listener"]["subscribers"]
                or health["leases"]
                or health["queues"] != {"queues": 0, "leases": 0, "taps": 0}
                or replica.handler._active_task_registry._active_tasks  # type: ignore[attr-defined]
            ):
                return False
        channels = await channels_under(admin, f"{prefix}:*")
        return not [c for c in channels if not c.endswith(b":control")]  # (each replica's own)

    await until(idle, "every feed, lease, channel and active task released", 30)
    for replica in (a, b):
        health = await replica.backend.health()
        assert health["ok"] is True
        assert health["listener"]["subscribers"] == 0 and health["listener"]["tasks"] == 0


#: The event loop keeps up to about a hundred cancelled timers (each with its context) in
#: its heap, and weak sets come and go: none of these belongs to a task or a subscriber.
LOOP_NOISE = (
    "asyncio.events.TimerHandle",
    "_contextvars.Context",
    "builtins.hamt",
    "builtins.hamt_bitmap_node",
    "builtins.hamt_array_node",
    "builtins.builtin_function_or_method",
    "weakref.ReferenceType",
)
#: Per-task and per-subscriber objects of ours, the SDK's and asyncio's: none may be left.
PER_TASK = (
    "a2a_redis.events.feed.TaskFeed",
    "a2a_redis.log.event_log.StreamEntry",
    "a2a_redis.events.leases._Lease",
    "a2a_redis.events.event_stream._OwnerWatch",
    "a2a.server.agent_execution.active_task.ActiveTask",
    "a2a.server.tasks.task_manager.TaskManager",
    "a2a_pb2.Task",
    "a2a_pb2.TaskStatusUpdateEvent",
    "a2a_pb2.TaskArtifactUpdateEvent",
    "_asyncio.Task",
    "_asyncio.Future",
    "builtins.coroutine",
    "builtins.async_generator",
    "asyncio.locks.Event",
)


def live_objects() -> Counter[str]:
    clear_id_cache()  # a bounded cache of encoded ids, not a leak
    gc.collect()
    return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())


async def load_and_release(replicas, prefix: str, tasks: int, rounds: int = 1) -> None:
    """A warm-up round, then ``rounds`` more: Python's objects must not grow with them."""
    a, b, admin = replicas
    await one_round(a, b, tasks)  # warm-up: imports, caches, pools, scripts
    await check_released(a, b, admin, prefix)
    before = live_objects()
    for _ in range(rounds):
        await one_round(a, b, tasks)
        await check_released(a, b, admin, prefix)
    after = live_objects()
    grown = {name: after[name] - before[name] for name in after if after[name] > before[name]}
    for name in PER_TASK:  # (asyncio's may differ by a process-wide loop or two: the
        # lease renewer and the fetcher end a moment after their last task)
        slack = 0 if name.startswith("a2a_redis.") else 4
        assert after[name] <= before[name] + slack, (name, before[name], after[name])
    # A leak grows with the tasks (one object per task: +tasks); allow a little noise.
    rest = sum(n for name, n in grown.items() if name not in LOOP_NOISE)
    assert rest < tasks // 4, sorted(grown.items(), key=lambda kv: -kv[1])[:20]


async def test_1000_streaming_tasks_with_2000_subscribers_all_complete_in_order(
    replicas, prefix: str
):
    a, b, admin = replicas
    await one_round(a, b, 1000)
    await check_released(a, b, admin, prefix)


async def test_memory_returns_to_its_baseline_after_200_tasks(replicas, prefix: str):
    await load_and_release(replicas, prefix, 200)


@pytest.mark.soak
async def test_memory_returns_to_its_baseline_after_rounds_of_1000_tasks(replicas, prefix: str):
    await load_and_release(replicas, prefix, 1000, rounds=4)
