"""The control plane: cancels across replicas, orphan detection, and what detection costs.

Two "replicas" in this one process, A and B: each a ``RedisBackend`` (its own pool and
pub/sub connection) with the V2 handler (``backend.request_handler``) and an agent that
says WORKING, then stays silent until cancelled (an agent waiting on a model).

Figures:

1. Cancel latency: from ``on_cancel_task`` called on B (the cancel is forwarded to A, which
   runs the agent) until A's own client stream has ended, beside the same cancel called on
   A itself (local). Median and p99.
2. Orphan detection: A "dies" (its lease renewals and heartbeats stop, nothing is released,
   as after SIGKILL) while running a task; the time until B's GetTask reads FAILED, with
   ``lease_ttl`` 1 s (the bound is 3 leases). The process tests log the same after a real
   SIGKILL (``tests/reliability/test_replica_death.py``).
3. Steady-state cost, on a private embedded server (its ``INFO commandstats``, so nothing
   else is counted): commands per second per replica while A runs 0, 1,000 and 10,000
   tasks and B sweeps; split into detection (B's sweeps) and A's lease upkeep (renewals,
   heartbeat and task set, which exist with or without detection).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

from a2a.helpers.proto_helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.cluster import TaskVersion
from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import EventQueue
from a2a.server.tasks.task_updater import TaskUpdater
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    GetTaskRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    Task,
    TaskState,
    TaskStatus,
)
from redis.asyncio import Redis

from a2a_redis import RedisBackend
from a2a_redis.ops.embedded import EmbeddedServer
from benchmarks.common import Benchmark, Report, RunContext, percentile
from benchmarks.event_stream import replica_client

S = TaskState
SWEEP_COMMANDS = 3  # server commands per sweep (commandstats counts a script's own calls)


class SilentAgent(AgentExecutor):
    """WORKING, then nothing until cancelled; its cancel reports CANCELED."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        if context.current_task is None:
            await event_queue.enqueue_event(new_task_from_user_message(context.message))
        await updater.start_work()
        await asyncio.sleep(3600)

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        await updater.cancel()


def _card() -> Any:
    from a2a.types.a2a_pb2 import AgentCapabilities, AgentCard

    return AgentCard(
        name="bench",
        description="bench",
        version="1",
        capabilities=AgentCapabilities(streaming=True),
    )


def _send() -> SendMessageRequest:
    import uuid

    return SendMessageRequest(
        message=Message(role=Role.ROLE_USER, message_id=uuid.uuid4().hex, parts=[Part(text="go")])
    )


async def _start(handler: Any, context: ServerCallContext) -> tuple[str, asyncio.Task[None]]:
    """Start a streaming send on ``handler``; the task id once WORKING, and the drain."""
    working: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def drain() -> None:
        async for event in handler.on_message_send_stream(_send(), context):
            status = getattr(event, "status", None)
            if status is not None and status.state == S.TASK_STATE_WORKING and not working.done():
                working.set_result(event.task_id)

    runner = asyncio.create_task(drain())
    return await asyncio.wait_for(working, 30), runner


@contextlib.asynccontextmanager
async def _pair(
    ctx: RunContext, prefix: str, **options: Any
) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    """Replicas A and B, each with its own client (pool and connections)."""
    clients = [
        replica_client(ctx, f"a2a-bench-{ctx.run_id[:12]}-ctl-{n}", blocking_pool=64) for n in "AB"
    ]
    a, b = (RedisBackend(c, prefix=prefix, **options) for c in clients)
    try:
        yield a, b
    finally:
        for backend, client in zip((a, b), clients, strict=True):
            await backend.aclose()
            await client.aclose()


async def cancel_latency(ctx: RunContext, prefix: str, samples: int) -> dict[str, list[float]]:
    context = ServerCallContext()
    async with _pair(ctx, prefix) as (a, b):
        ha, hb = (
            a.request_handler(SilentAgent(), _card()),
            b.request_handler(SilentAgent(), _card()),
        )
        times: dict[str, list[float]] = {"local (on A)": [], "forwarded (B to A)": []}
        for i in range(samples * 2):
            label, via = ("local (on A)", ha) if i % 2 else ("forwarded (B to A)", hb)
            task_id, runner = await _start(ha, context)
            start = time.perf_counter()
            await via.on_cancel_task(CancelTaskRequest(id=task_id), context)
            await asyncio.wait_for(runner, 30)
            times[label].append((time.perf_counter() - start) * 1000)
        return times


async def orphan_detection(ctx: RunContext, prefix: str, samples: int, lease: float) -> list[float]:
    context = ServerCallContext()
    found = []
    for i in range(samples):
        async with _pair(ctx, f"{prefix}:{i}", lease_ttl=lease) as (a, b):
            ha, hb = (
                a.request_handler(SilentAgent(), _card()),
                b.request_handler(SilentAgent(), _card()),
            )
            task_id, runner = await _start(ha, context)
            await hb.on_get_task(GetTaskRequest(id=task_id), context)  # B's plane is up
            renewer = a.leases._renewer
            assert renewer is not None
            a.leases._closed = True  # A dies: no renewal, nothing released
            renewer.cancel()
            a.leases._held.clear()
            await a.control.reaper.aclose()  # a dead replica sweeps nothing either
            died = time.perf_counter()
            while True:
                task = await hb.on_get_task(GetTaskRequest(id=task_id), context)
                if task is not None and task.status.state == S.TASK_STATE_FAILED:
                    break
                await asyncio.sleep(0.01)
            found.append(time.perf_counter() - died)
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
    return found


async def _working(backend: RedisBackend, task_id: str) -> None:
    task = Task(id=task_id, context_id="c", status=TaskStatus(state=S.TASK_STATE_WORKING))
    await backend.task_store.save(
        task, prev_version=TaskVersion.MISSING, context=ServerCallContext()
    )


async def _calls(redis: Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def upkeep_cost(tasks: int, seconds: float, lease: float) -> tuple[float, float]:
    """(detection, lease upkeep) server commands per second, on a private server."""
    with EmbeddedServer() as server:
        a = RedisBackend.from_url(server.url, prefix="cost", lease_ttl=lease)
        b = RedisBackend.from_url(server.url, prefix="cost", lease_ttl=lease)
        admin = Redis.from_url(server.url)
        try:
            for start in range(0, tasks, 500):  # running tasks: a WORKING record, held
                batch = [f"t{i}" for i in range(start, min(tasks, start + 500))]
                await asyncio.gather(*(_working(a, t) for t in batch))
                await asyncio.gather(*(a.leases.hold_now(t) for t in batch))
            b.control.ensure_started()
            await b.control.ready()
            await asyncio.sleep(lease)  # settle into the steady state
            before, sweeps = await _calls(admin), b.control.reaper.sweeps
            await asyncio.sleep(seconds)
            after, swept = await _calls(admin), b.control.reaper.sweeps - sweeps
            total = sum(after.values()) - sum(before.values())
            total -= after.get("info", 0) - before.get("info", 0)
            # A sweep is one round trip: EVALSHA, and the script's TIME and ZRANGEBYSCORE.
            detection = SWEEP_COMMANDS * swept / seconds
            return detection, total / seconds - detection
        finally:
            await a.aclose()
            await b.aclose()
            await admin.aclose()


async def run(ctx: RunContext, report: Report) -> None:
    samples = 10 if ctx.quick else 60
    times = await cancel_latency(ctx, ctx.namespace("cancel"), samples)
    with report.group(
        "cancel: CancelTask until A's stream ended (V2, silent agent)", "ms",
        higher_is_better=False,
    ) as g:  # fmt: skip
        for label, values in times.items():
            values.sort()
            for metric, q in (("median", 50), ("p99", 99)):
                g.add(label, percentile(values, q), metric=metric, anchor=label.startswith("local"))
    lease = 1.0
    found = sorted(
        await orphan_detection(ctx, ctx.namespace("orphans"), 3 if ctx.quick else 8, lease)
    )
    with report.group(
        f"orphan detection: A dies, until B reads FAILED (lease_ttl {lease:g}s)", "s",
        higher_is_better=False,
    ) as g:  # fmt: skip
        g.add("median", statistics.median(found))
        g.add("max", found[-1])
        g.add("bound: 3 x lease_ttl", 3 * lease, anchor=True)
    seconds = 3.0 if ctx.quick else 10.0
    with report.group(
        f"steady-state server commands/s per replica (lease_ttl {lease:g}s; a script's own "
        "calls count)", "commands/s",
        higher_is_better=False,
    ) as g:  # fmt: skip
        for n in (0, 1_000, 10_000):
            detection, upkeep = await upkeep_cost(n, seconds, lease)
            g.add(f"{n:,} running tasks", detection, metric="detection (B's sweeps)")
            g.add(f"{n:,} running tasks", upkeep, metric="lease upkeep (A)")
    report.note(
        "detection is one round trip (3 server commands) per replica per lease_ttl, whatever "
        "the number of tasks; lease upkeep (existing before detection) is one renewal script "
        "(5 server commands) per running task per lease_ttl/3, in one pipeline"
    )


BENCHMARK = Benchmark("control", "cross-replica cancel, orphan detection and its cost", run)
