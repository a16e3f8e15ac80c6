"""What OpenTelemetry costs: save throughput and cross-replica delivery, three ways.

The same workload runs with ``a2a_redis.telemetry`` in three modes, in interleaved turns
(``measure_rates``), so that load from elsewhere on the machine lands on all three:

* **no OpenTelemetry**: ``telemetry.configure(enabled=False)``, the module's switch, which
  takes exactly the paths the package takes when ``opentelemetry`` cannot be imported
  (``tests/telemetry/test_without_otel.py`` runs those with the import blocked);
* **API only**: the ``otel`` extra, no SDK: the API's no-op meter and tracer;
* **SDK + exporter**: the SDK's ``MeterProvider`` (an ``InMemoryMetricReader``) and
  ``TracerProvider`` with a ``SimpleSpanProcessor`` into an ``InMemorySpanExporter``
  (each span exported as it ends: the dearest processor). No request span of the
  caller's is made: the figures are our instrumentation's cost alone.

Figures: versioned saves per second (one coroutine: a chain of CAS updates, each with its
event; and 16 coroutines, a task each), and deliveries per second, one at a time (A saves
an event, B's subscriber receives it, then the next). The ratios to "no OpenTelemetry" are
the overhead. Targets on the development machine: API only at most 3% below, SDK at most 15%.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from a2a.server.cluster import TaskVersion
from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import Task, TaskState, TaskStatus, TaskStatusUpdateEvent
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from a2a_redis import telemetry
from a2a_redis.events.event_stream import RedisTaskEventStream
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from benchmarks.common import Benchmark, Report, RunContext, measure_rates
from benchmarks.event_stream import replica_client

CTX = ServerCallContext()
OFF, API, SDK = "no OpenTelemetry", "API only (no-op)", "SDK + exporter"
MODES = (OFF, API, SDK)
CONCURRENCY = 16
Step = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Sizes:
    seconds: float
    rounds: int
    warmup: float


FULL = Sizes(seconds=2.0, rounds=7, warmup=0.5)
QUICK = Sizes(seconds=0.6, rounds=3, warmup=0.2)


class Modes:
    """Switches ``a2a_redis.telemetry`` between the three modes (only when it changes)."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
        self.current = ""

    def use(self, mode: str) -> None:
        if mode == self.current:
            return
        self.current = mode
        self.exporter.clear()
        if mode == OFF:
            telemetry.configure(enabled=False)
        elif mode == API:
            telemetry.configure()  # the global providers: never set here, so the no-ops
        else:
            telemetry.configure(meter_provider=self.meters, tracer_provider=self.tracers)

    def close(self) -> None:
        telemetry.configure()
        self.tracers.shutdown()
        self.meters.shutdown()


def _event(task_id: str) -> TaskStatusUpdateEvent:
    event = TaskStatusUpdateEvent(task_id=task_id, context_id="bench")
    event.status.state = TaskState.TASK_STATE_WORKING
    return event


class Chain:
    """One task updated by CAS saves, each carrying its event, in one telemetry mode."""

    def __init__(self, store: VersionedRedisTaskStore, modes: Modes, mode: str, task_id: str):
        self.store, self.modes, self.mode = store, modes, mode
        self.task = Task(id=task_id, context_id="bench", status=TaskStatus())
        self.version = TaskVersion.MISSING

    async def step(self) -> None:
        self.modes.use(self.mode)
        event = _event(self.task.id) if self.version else self.task
        self.version = await self.store.save(
            self.task, event=event, prev_version=self.version, context=CTX
        )


class Delivery:
    """A's save of one event until B's subscriber has it, in one telemetry mode."""

    def __init__(self, chain: Chain, b: RedisTaskEventStream) -> None:
        self.chain, self.b = chain, b
        self.got = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.chain.step()  # the Task: the stream exists
        self.chain.modes.use(self.chain.mode)  # the subscriber's telemetry is its mode's
        joined = asyncio.Event()
        self.reader = asyncio.ensure_future(self._read(joined))
        await joined.wait()
        await asyncio.sleep(0.05)

    async def _read(self, joined: asyncio.Event) -> None:
        subscription = self.b.subscribe(self.chain.task.id, after=self.chain.version)
        joined.set()
        async for _ in subscription:
            self.got.set()

    async def stop(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)

    async def step(self) -> None:
        self.got.clear()
        await self.chain.step()
        await self.got.wait()


async def run(ctx: RunContext, report: Report) -> None:
    sizes = QUICK if ctx.quick else FULL
    modes = Modes()
    a_client, b_client = replica_client(ctx, "otel-a"), replica_client(ctx, "otel-b")
    prefix = ctx.namespace("otel")
    a_store = VersionedRedisTaskStore(a_client, prefix=prefix)
    b = RedisTaskEventStream(b_client, task_store=VersionedRedisTaskStore(b_client, prefix=prefix))
    ids = (f"t{n}" for n in itertools.count())
    try:
        for concurrency in (1, CONCURRENCY):
            chains = {
                m: [Chain(a_store, modes, m, next(ids)) for _ in range(concurrency)] for m in MODES
            }
            results = await measure_rates(
                {m: [c.step for c in mine] for m, mine in chains.items()},
                seconds=sizes.seconds,
                rounds=sizes.rounds,
                warmup=sizes.warmup,
            )
            title = f"versioned save with its event, {concurrency} coroutine(s)"
            with report.group(title, "saves/s", higher_is_better=True) as group:
                for mode, result in results.items():
                    group.add(mode, result.rate, anchor=mode == OFF, detail=result.detail())
            _overhead(report, title, {m: r.rate for m, r in results.items()})
        deliveries = {m: Delivery(Chain(a_store, modes, m, next(ids)), b) for m in MODES}
        for delivery in deliveries.values():
            await delivery.start()
        results = await measure_rates(
            {m: [d.step] for m, d in deliveries.items()},
            seconds=sizes.seconds,
            rounds=sizes.rounds,
            warmup=sizes.warmup,
        )
        title = "cross-replica delivery, one event at a time (A saves, B receives)"
        with report.group(title, "events/s", higher_is_better=True) as group:
            for mode, result in results.items():
                group.add(mode, result.rate, anchor=mode == OFF, detail=result.detail())
        _overhead(report, title, {m: r.rate for m, r in results.items()})
    finally:
        for delivery in locals().get("deliveries", {}).values():
            await delivery.stop()
        await b.aclose()
        await a_client.aclose()
        await b_client.aclose()
        modes.close()


def _overhead(report: Report, title: str, rates: dict[str, float]) -> None:
    base = rates[OFF]
    costs = {m: (1 - rates[m] / base) * 100 for m in (API, SDK)}
    report.facts.setdefault("overhead_percent", {})[title] = costs
    report.note(
        f"{title}: API only costs {costs[API]:+.1f}%, SDK + exporter {costs[SDK]:+.1f}% "
        "of the throughput without OpenTelemetry (negative: within noise, faster)"
    )


BENCHMARK = Benchmark(
    "otel",
    "OpenTelemetry overhead: save and delivery without it, with the API only, with the SDK",
    run,
)
