"""Push delivery: throughput, the cost on the task's path, and save-to-200 latency.

A fast webhook receiver (Starlette under uvicorn, in this process, on loopback) answers
200 at once and notes when each notification arrived. The anchor in every group is the
SDK's ``BasePushNotificationSender`` (inline POST, no retries) over the same push-config
store and the same receiver, measured in the same run.

Figures:

1. Deliveries per second: tasks with one config each, their events already saved; the
   time until the receiver has them all. ``RedisPushNotificationSender`` (its workers,
   one replica) beside the SDK's sender called for every event, tasks in parallel, events
   of a task in order (as the SDK's consumer calls it).
2. Added latency on the task's path: ``send_notification`` per event, with and without a
   config, beside the SDK's (which reads the configs and POSTs before it returns).
3. Save to the receiver's 200, median and p99: one event at a time, from before the
   versioned save to the receiver's arrival.
4. Recovery: a replica holding jobs dies (its workers stop, nothing is released); the time
   until the other replica has delivered everything, with ``claim_after`` 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from a2a.server.cluster.version import TaskVersion
from a2a.server.context import ServerCallContext
from a2a.server.tasks import BasePushNotificationSender
from a2a.types.a2a_pb2 import Task, TaskPushNotificationConfig, TaskState, TaskStatusUpdateEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from a2a_redis import RedisBackend
from a2a_redis.push import RedisPushNotificationSender
from benchmarks.common import Benchmark, Report, RunContext, percentile
from benchmarks.event_stream import replica_client

WORKING = TaskState.TASK_STATE_WORKING
CONTEXT = ServerCallContext()


class _Receiver:
    """Answers 200 at once; counts arrivals and notes the time of each ``metadata.n``."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.count = 0
        self.arrived: dict[str, float] = {}
        self.app = Starlette(routes=[Route("/{name}", self._handle, methods=["POST"])])

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    async def _handle(self, request: Request) -> Response:
        body = await request.json()
        self.count += 1
        mark = body.get("statusUpdate", {}).get("metadata", {}).get("mark")
        if mark:
            self.arrived[mark] = time.perf_counter()
        return Response(status_code=200)


@contextlib.asynccontextmanager
async def _serving() -> AsyncIterator[_Receiver]:
    receiver = _Receiver()
    server = uvicorn.Server(
        uvicorn.Config(
            receiver.app, host="127.0.0.1", port=receiver.port, log_level="error",
            lifespan="off", access_log=False,
        )
    )  # fmt: skip
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield receiver
    finally:
        server.should_exit = True
        await task


async def _until(condition: Any, what: str, guard: float = 300.0) -> None:
    """Wait for ``condition()``; a hang guard, not a measurement: fail after ``guard`` s."""
    deadline = time.perf_counter() + guard
    while not condition():
        if time.perf_counter() > deadline:
            raise RuntimeError(f"push benchmark: not within {guard:g} s: {what}")
        await asyncio.sleep(0.0005)


def _event(task_id: str, mark: str = "") -> TaskStatusUpdateEvent:
    event = TaskStatusUpdateEvent(task_id=task_id, context_id="c", metadata={"mark": mark})
    event.status.state = WORKING
    return event


async def _task_with_config(
    backend: RedisBackend, task_id: str, url: str | None
) -> tuple[Task, TaskVersion]:
    task = Task(id=task_id, context_id="c")
    task.status.state = WORKING
    if url is not None:
        config = TaskPushNotificationConfig(task_id=task_id, id="hook", url=url)
        await backend.push_config_store.set_info(task_id, config, CONTEXT)
    version = await backend.task_store.save(
        task, event=task, prev_version=TaskVersion.MISSING, context=CONTEXT
    )
    return task, version


def _sender(backend: RedisBackend, **options: Any) -> RedisPushNotificationSender:
    return RedisPushNotificationSender(
        backend.redis, backend.push_config_store, backend.event_stream,
        allow_hosts=["127.0.0.1"], **options,
    )  # fmt: skip


async def _throughput(
    ctx: RunContext, prefix: str, receiver: _Receiver, tasks: int, events: int
) -> tuple[float, float]:
    """(a2a-redis, SDK) deliveries per second for ``tasks`` x (``events`` + 1) notifications."""
    client = replica_client(ctx, "a2a-bench-push", blocking_pool=64)
    backend = RedisBackend(client, prefix=prefix)
    backend.push_config_store.record_deliveries()  # jobs recorded; no worker yet
    http = httpx.AsyncClient()
    sender: RedisPushNotificationSender | None = None
    try:
        saved: list[tuple[Task, list[TaskStatusUpdateEvent]]] = []
        for t in range(tasks):
            task, version = await _task_with_config(backend, f"t{t}", receiver.url("x"))
            updates = [_event(task.id) for _ in range(events)]
            for update in updates:
                version = await backend.task_store.save(
                    task, event=update, prev_version=version, context=CONTEXT
                )
            saved.append((task, updates))
        total = tasks * (events + 1)
        before, start = receiver.count, time.perf_counter()
        sender = _sender(backend)
        await sender.start()
        await _until(lambda: receiver.count - before >= total, "a2a-redis deliveries")
        ours = total / (time.perf_counter() - start)
        await sender.aclose()
        sdk = BasePushNotificationSender(http, backend.push_config_store)

        async def one_task(task: Task, updates: list[TaskStatusUpdateEvent]) -> None:
            await sdk.send_notification(task.id, task)
            for update in updates:
                await sdk.send_notification(task.id, update)

        before, start = receiver.count, time.perf_counter()
        await asyncio.gather(*(one_task(t, u) for t, u in saved))
        await _until(lambda: receiver.count - before >= total, "SDK deliveries")
        return ours, total / (time.perf_counter() - start)
    finally:
        if sender is not None:
            await sender.aclose()
        await http.aclose()
        await backend.aclose()
        await client.aclose()


async def _latencies(
    ctx: RunContext, prefix: str, receiver: _Receiver, samples: int
) -> dict[str, list[float]]:
    """Per-event seconds: send_notification with and without a config, and save to 200."""
    client = replica_client(ctx, "a2a-bench-push-lat", blocking_pool=64)
    backend = RedisBackend(client, prefix=prefix)
    sender = _sender(backend)
    http = httpx.AsyncClient()
    sdk = BasePushNotificationSender(http, backend.push_config_store)
    out: dict[str, list[float]] = {}
    try:
        await sender.start()
        for label, task_id, url in (
            ("a2a-redis, config", "ours-with", receiver.url("y")),
            ("a2a-redis, none", "ours-without", None),
            ("SDK, config", "sdk-with", receiver.url("y")),
            ("SDK, none", "sdk-without", None),
        ):
            if label.startswith("SDK"):
                await sender.aclose()  # its workers would deliver the SDK's events too
            task, version = await _task_with_config(backend, task_id, url)
            notify = sdk if label.startswith("SDK") else sender
            call, save_to_200 = out.setdefault(label, []), []
            for i in range(samples):
                mark = f"{label}:{i}"
                event = _event(task.id, mark)
                start = time.perf_counter()
                version = await backend.task_store.save(
                    task, event=event, prev_version=version, context=CONTEXT
                )
                saved = time.perf_counter()
                await notify.send_notification(task.id, event)
                call.append(time.perf_counter() - saved)
                if url is not None:
                    await _until(lambda m=mark: m in receiver.arrived, "a notification")
                    save_to_200.append(receiver.arrived[mark] - start)
            if url is not None:
                out[f"{label}: save to 200"] = save_to_200
        return out
    finally:
        await sender.aclose()
        await http.aclose()
        await backend.aclose()
        await client.aclose()


async def _recovery(
    ctx: RunContext, prefix: str, receiver: _Receiver, tasks: int, claim_after: float
) -> float:
    """Seconds from a replica's death to the other replica having delivered everything."""
    clients = [replica_client(ctx, f"a2a-bench-push-{n}", blocking_pool=64) for n in "AB"]
    a, b = (RedisBackend(c, prefix=prefix) for c in clients)
    dying, survivor = _sender(a, claim_after=claim_after), _sender(b, claim_after=claim_after)
    try:
        before = receiver.count
        saved = [await _task_with_config(a, f"r{t}", receiver.url("z")) for t in range(tasks)]
        await dying.start()
        await _until(lambda: dying.stats()["jobs"] >= tasks, "A holding every job")
        await _until(lambda: receiver.count - before >= tasks, "each task's first event")
        await dying.aclose()  # A dies: its jobs stay pending, unrenewed
        died = time.perf_counter()
        await survivor.start()
        for task, version in saved:
            await a.task_store.save(
                task, event=_event(task.id), prev_version=version, context=CONTEXT
            )
        await _until(lambda: receiver.count - before >= 2 * tasks, "B delivering")
        return time.perf_counter() - died
    finally:
        await survivor.aclose()
        for backend, client in zip((a, b), clients, strict=True):
            await backend.aclose()
            await client.aclose()


async def run(ctx: RunContext, report: Report) -> None:
    tasks, events, samples = (20, 10, 50) if ctx.quick else (100, 20, 300)
    async with _serving() as receiver:
        ours, sdk = await _throughput(ctx, ctx.namespace("push-rate"), receiver, tasks, events)
        with report.group(
            f"push deliveries/s to a local receiver ({tasks} tasks x {events + 1} events)",
            "deliveries/s", higher_is_better=True,
        ) as g:  # fmt: skip
            g.add("a2a-redis workers", ours)
            g.add("SDK BasePushNotificationSender", sdk, anchor=True)
        times = await _latencies(ctx, ctx.namespace("push-lat"), receiver, samples)
        with report.group(
            "added latency on the task's path: send_notification per event", "ms",
            higher_is_better=False,
        ) as g:  # fmt: skip
            for label in ("a2a-redis, config", "a2a-redis, none", "SDK, config", "SDK, none"):
                values = sorted(times[label])
                for metric, q in (("median", 50), ("p99", 99)):
                    anchor = label.startswith("SDK")
                    g.add(label, percentile(values, q) * 1000, metric=metric, anchor=anchor)
        with report.group("save to the receiver's 200", "ms", higher_is_better=False) as g:
            for label in ("a2a-redis, config: save to 200", "SDK, config: save to 200"):
                values = sorted(times[label])
                for metric, q in (("median", 50), ("p99", 99)):
                    name = label.split(":")[0].split(",")[0]
                    anchor = name == "SDK"
                    g.add(name, percentile(values, q) * 1000, metric=metric, anchor=anchor)
    claim_after = 1.0
    recovered = []
    for i in range(2 if ctx.quick else 5):
        async with _serving() as receiver:  # a fresh receiver and namespace per sample
            recovered.append(
                await _recovery(ctx, ctx.namespace(f"push-rec{i}"), receiver, 20, claim_after)
            )
    with report.group(
        f"recovery: a replica dies holding 20 jobs, until all delivered (claim_after "
        f"{claim_after:g} s)", "s", higher_is_better=False,
    ) as g:  # fmt: skip
        g.add("median", statistics.median(recovered))
        g.add("max", max(recovered))
        g.add("bound: claim_after + claim_after/3", claim_after * 4 / 3, anchor=True)
    report.note(
        "a2a-redis's send_notification is no command at all (the save recorded the event); "
        "the SDK's reads the configs and POSTs inline, once, with no retry"
    )


BENCHMARK = Benchmark("push", "push delivery: rate, cost on the task's path, latency", run)
