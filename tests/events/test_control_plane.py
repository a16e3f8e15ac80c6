"""The control plane in process, on every real server: the orphan reaper's rules, races and
cost, and forwarded cancels' fallbacks.

A replica "dies" here by stopping its lease keeper's renewals without releasing anything
(what SIGKILL leaves behind); the process tests kill real processes
(``tests/reliability/test_replica_death.py``, ``tests/backend/test_control.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from a2a.helpers.proto_helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.cluster import ConcurrentTaskModificationError, TaskVersion, VersionedEvent
from a2a.server.events.event_queue import EventQueue
from a2a.server.tasks.task_updater import TaskUpdater
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    SendMessageRequest,
    Task,
    TaskState,
    TaskStatusUpdateEvent,
)

from a2a_redis import RedisBackend, TerminalStateError
from a2a_redis.events.orphans import LOST_REPLICA_TEXT
from a2a_redis.events.tokens import replica_of
from a2a_redis.handlers.cancel import record_cancel
from a2a_redis.log.codec import version_int
from tests.helpers import agent_card, ctx, eventually, make_task, user_message

S = TaskState
LEASE = 0.5  # seconds: the replicas' lease (the reaper's sweeps are driven by hand here)


@contextlib.asynccontextmanager
async def replicas(
    url: str, prefix: str, n: int, **options: Any
) -> AsyncIterator[list[RedisBackend]]:
    made = [RedisBackend.from_url(url, prefix=prefix, lease_ttl=LEASE, **options) for _ in range(n)]
    try:
        yield made
    finally:
        for backend in made:
            await backend.aclose()


async def run_task(backend: RedisBackend, task_id: str) -> TaskVersion:
    """``backend``'s agent starts ``task_id``: WORKING, saved and published as the SDK does."""
    task = make_task(task_id, state=S.TASK_STATE_WORKING)
    version = await backend.task_store.save(
        task, event=task, prev_version=TaskVersion.MISSING, context=ctx()
    )
    await backend.event_stream.publish(task_id, VersionedEvent(task, version))
    return version


def die(backend: RedisBackend) -> None:
    """The replica stops renewing (and heartbeating), and releases nothing: it is dead."""
    renewer = backend.leases._renewer
    assert renewer is not None
    renewer.cancel()
    backend.leases._closed = True  # nothing renews, and aclose releases nothing
    backend.leases._held.clear()


async def lapsed(backend: RedisBackend, task_id: str) -> None:
    key = backend.task_store.keys.lease(task_id)
    await eventually(lambda: _absent(backend, key), what="the dead replica's lease lapsed")


async def _absent(backend: RedisBackend, key: str) -> bool:
    return await backend.redis.get(key) is None


async def state_of(backend: RedisBackend, task_id: str) -> Task:
    stored = await backend.task_store.get(task_id, ctx())
    assert stored is not None
    return stored.task


async def test_a_dead_replicas_running_task_ends_failed_once_with_a_clear_message(
    real_url: str, prefix: str
):
    async with replicas(real_url, prefix, 3) as (a, b, c):
        await run_task(a, "t")
        await run_task(a, "waiting")  # then it waits for input: not an orphan
        task = make_task("waiting", state=S.TASK_STATE_INPUT_REQUIRED)
        stored = await a.task_store.get("waiting", ctx())
        assert stored is not None
        await a.task_store.save(task, event=None, prev_version=stored.version, context=ctx())
        assert replica_of(await a.redis.get(a.task_store.keys.lease("t"))) == a.leases.replica
        die(a)
        await lapsed(b, "t")
        # Two survivors sweep at once: exactly one ends the task.
        ended = await eventually(lambda: _sweep_both(b, c), what="a survivor saw the dead replica")
        assert ended == 1
        failed = await state_of(b, "t")
        assert failed.status.state == S.TASK_STATE_FAILED
        assert failed.status.message.parts[0].text == LOST_REPLICA_TEXT
        assert (await state_of(b, "waiting")).status.state == S.TASK_STATE_INPUT_REQUIRED
        versions = [e.version for e in await _entries(b, "t")]
        assert versions == sorted(set(versions))  # one FAILED entry, after A's
        # The dead replica is forgotten once its tasks are handled.
        await eventually(
            lambda: _forgotten(b, a.leases.replica), what="the dead replica was forgotten"
        )


async def _entries(backend: RedisBackend, task_id: str) -> list[Any]:
    from a2a_redis.log.event_log import decode_rows

    key = backend.task_store.keys.events(task_id)
    return [e for e in decode_rows(key, await backend.redis.xrange(key)) if e.event is not None]


async def _sweep_both(b: RedisBackend, c: RedisBackend) -> int:
    ended = await asyncio.gather(b.control.reaper.sweep(), c.control.reaper.sweep())
    return sum(ended)


async def _forgotten(b: RedisBackend, replica: str) -> bool:
    await b.control.reaper.sweep()
    return await b.redis.zscore(b.task_store.keys.replicas, replica) is None


async def test_two_reapers_writing_the_same_orphan_at_once_write_failed_once(
    real_url: str, prefix: str
):
    async with replicas(real_url, prefix, 3) as (a, b, c):
        version = await run_task(a, "t")
        die(a)
        await lapsed(b, "t")
        wrote = await asyncio.gather(
            b.control.reaper._end("t"),  # past the claim: the write decides
            c.control.reaper._end("t"),
        )
        assert sorted(wrote) == [False, True]
        stored = await b.task_store.get("t", ctx())
        assert stored is not None
        assert version_int(stored.version) == version_int(version) + 1  # one FAILED write


async def test_the_slow_owner_that_comes_back_is_refused(real_url: str, prefix: str):
    async with replicas(real_url, prefix, 2) as (a, b):
        version = await run_task(a, "t")
        die(a)
        await lapsed(b, "t")
        await eventually(lambda: b.control.reaper.sweep(), what="the orphan was ended")
        late = make_task("t", state=S.TASK_STATE_WORKING)
        event = TaskStatusUpdateEvent(task_id="t", context_id="ctx", status=late.status)
        with pytest.raises(ConcurrentTaskModificationError):  # (its version is stale too)
            await a.task_store.save(late, event=event, prev_version=version, context=ctx())
        stored = await b.task_store.get("t", ctx())
        assert stored is not None
        with pytest.raises(TerminalStateError):  # even at the current version
            await a.task_store.save(late, event=event, prev_version=stored.version, context=ctx())
        assert (await state_of(b, "t")).status.state == S.TASK_STATE_FAILED


async def test_under_keep_a_dead_replicas_task_stays_and_the_replica_is_forgotten(
    real_url: str, prefix: str
):
    async with replicas(real_url, prefix, 2, orphan_policy="keep") as (a, b):
        await run_task(a, "t")
        die(a)
        await lapsed(b, "t")
        await eventually(lambda: _forgotten(b, a.leases.replica), what="forgotten")
        assert (await state_of(b, "t")).status.state == S.TASK_STATE_WORKING


async def commands_sent(backend: RedisBackend, call: Any) -> tuple[Any, int]:
    """Await ``call``; its result and how many commands ``backend``'s client sent."""
    sent = []
    original = backend.redis.execute_command

    async def counting(*args: Any, **kwargs: Any) -> Any:
        sent.append(args[0])
        return await original(*args, **kwargs)

    backend.redis.execute_command = counting  # type: ignore[method-assign]
    try:
        return await call, len(sent)
    finally:
        backend.redis.execute_command = original  # type: ignore[method-assign]


async def test_a_sweep_costs_one_command_whatever_the_number_of_running_tasks(
    real_url: str, prefix: str
):
    async with replicas(real_url, prefix, 2) as (a, b):
        counts = {}
        for n in (0, 1000):
            await asyncio.gather(*(a.leases.hold_now(f"t{i}") for i in range(n)))
            ended, counts[n] = await commands_sent(b, b.control.reaper.sweep())
            assert ended == 0  # A is alive: nothing to end
        assert counts == {0: 1, 1000: 1}


async def test_a_cancel_racing_completion_ends_in_one_terminal_state(real_url: str, prefix: str):
    async with replicas(real_url, prefix, 2) as (a, b):
        for round_ in range(10):
            task_id = f"t{round_}"
            version = await run_task(a, task_id)
            done = make_task(task_id, state=S.TASK_STATE_COMPLETED)
            event = TaskStatusUpdateEvent(task_id=task_id, context_id="ctx", status=done.status)
            outcomes = await asyncio.gather(
                a.task_store.save(done, event=event, prev_version=version, context=ctx()),
                record_cancel(b.task_store, task_id, ctx()),
                return_exceptions=True,
            )
            won = [o for o in outcomes if not isinstance(o, BaseException)]
            assert len(won) == 1, outcomes  # exactly one terminal write landed
            lost = [o for o in outcomes if isinstance(o, BaseException)]
            assert isinstance(lost[0], ConcurrentTaskModificationError)
            final = {(await state_of(x, task_id)).status.state for x in (a, b)}
            assert len(final) == 1 and final <= {S.TASK_STATE_COMPLETED, S.TASK_STATE_CANCELED}


async def test_a_forwarded_cancel_falls_back_when_the_holder_does_not_answer(
    real_url: str, prefix: str
):
    async with replicas(real_url, prefix, 1, cancel_timeout=0.3) as (b,):
        assert await b.control.forward_cancel("nobody-holds-it") is None  # no lease: 1 GET
        assert b.control.stats()["cancels_forwarded"] == 0
        lease = b.task_store.keys.lease("t")
        await b.redis.set(lease, b"0123456789abcdef-00:10000", px=10_000)  # a silent holder
        assert await b.control.forward_cancel("t") is None  # waited cancel_timeout, gave up
        stats = b.control.stats()
        assert stats["cancels_forwarded"] == 1 and stats["cancels_fallen_back"] == 1
        # A garbage control message is ignored; the plane keeps serving.
        channel = b.task_store.keys.control(b.leases.replica)
        await b.redis.execute_command(b.task_store.keys.publish, channel, b"\xc1garbage")
        await b.redis.set(lease, b"0123456789abcdef-00:10000", px=10_000)
        assert await b.control.forward_cancel("t") is None
        assert b.control.stats()["cancels_fallen_back"] == 2


class SilentAgent(AgentExecutor):
    """WORKING, then nothing until cancelled; counts its cancels."""

    def __init__(self) -> None:
        self.cancels = 0

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        if context.current_task is None:
            await event_queue.enqueue_event(new_task_from_user_message(context.message))
        await TaskUpdater(event_queue, str(context.task_id), str(context.context_id)).start_work()
        await asyncio.sleep(3600)

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        self.cancels += 1


async def start_working(handler: Any) -> tuple[str, asyncio.Task[list[Any]]]:
    """A streaming send on ``handler``: the task id once WORKING, and the task draining the
    stream (its result: every event)."""
    working: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def drain() -> list[Any]:
        seen = []
        request = SendMessageRequest(message=user_message("go"))
        async for event in handler.on_message_send_stream(request, ctx()):
            seen.append(event)
            status = getattr(event, "status", None)
            if status is not None and status.state == S.TASK_STATE_WORKING and not working.done():
                working.set_result(event.task_id)
        return seen

    runner = asyncio.create_task(drain())
    return await asyncio.wait_for(working, 30), runner


async def test_two_replicas_forwarding_cancels_at_once_cancel_the_agent_once(
    real_url: str, prefix: str
):
    async with replicas(real_url, prefix, 3) as (a, b, c):
        agent = SilentAgent()
        ha = a.request_handler(agent, agent_card())
        hb, hc = (x.request_handler(SilentAgent(), agent_card()) for x in (b, c))
        task_id, runner = await start_working(ha)
        answers = await asyncio.gather(
            hb.on_cancel_task(CancelTaskRequest(id=task_id), ctx()),
            hc.on_cancel_task(CancelTaskRequest(id=task_id), ctx()),
            return_exceptions=True,
        )
        states = {x.status.state for x in answers if not isinstance(x, BaseException)}
        assert states == {S.TASK_STATE_CANCELED}, answers
        seen = await asyncio.wait_for(runner, 30)
        assert seen[-1].status.state == S.TASK_STATE_CANCELED  # A's stream ended with it
        assert agent.cancels == 1  # the agent's cancel ran once, on A
        assert b.control.stats()["cancels_answered"] + c.control.stats()["cancels_answered"] >= 1
        assert (await state_of(c, task_id)).status.state == S.TASK_STATE_CANCELED


async def test_a_cancel_recorded_elsewhere_stops_the_agent_at_its_next_renewal(
    real_url: str, prefix: str
):
    """The forwarded request is lost (or the holder too slow): B records CANCELED itself;
    A's lease renewal finds the record terminal and stops the agent; A's stream ends."""
    async with replicas(real_url, prefix, 2) as (a, b):
        agent = SilentAgent()
        ha = a.request_handler(agent, agent_card())
        hb = b.request_handler(SilentAgent(), agent_card())

        async def lost(task_id: str) -> None:
            return None  # as if A never answered within cancel_timeout

        b.control.forward_cancel = lost  # type: ignore[method-assign,assignment]
        task_id, runner = await start_working(ha)
        cancelled = await hb.on_cancel_task(CancelTaskRequest(id=task_id), ctx())
        assert cancelled.status.state == S.TASK_STATE_CANCELED  # recorded by B
        seen = await asyncio.wait_for(runner, 30)  # A's agent was stopped: its stream ends
        assert seen[-1].status.state == S.TASK_STATE_CANCELED
        await eventually(lambda: a.control.stats()["agents_stopped"] == 1, what="stopped")
        assert agent.cancels == 1
        assert (await state_of(a, task_id)).status.state == S.TASK_STATE_CANCELED
