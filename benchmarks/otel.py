"""What OpenTelemetry costs: save throughput and cross-replica delivery, four ways.

The same workload runs with ``a2a_redis.telemetry`` in four modes, side by side: many
short rounds in turns (each turn one round of each mode, in rotating order), the cost taken
as the median of the per-turn throughput ratios, so that load from elsewhere on the
machine hits the modes alike. The client process's CPU time per operation is given too:
it is what the instrumentation itself spends.

* **no OpenTelemetry**: ``telemetry.configure(enabled=False)``, the module's switch, which
  takes exactly the paths the package takes when ``opentelemetry`` cannot be imported
  (``tests/telemetry/test_without_otel.py`` runs those with the import blocked);
* **API only**: the ``otel`` extra, no SDK: the API's no-op meter and tracer;
* **SDK + exporter**: the SDK's ``MeterProvider`` (an ``InMemoryMetricReader``) and
  ``TracerProvider`` with a ``BatchSpanProcessor`` (what production uses) into an
  ``InMemorySpanExporter``. No request span of the
  caller's is made: the figures are our instrumentation's cost alone;
* **SDK calls alone**: no instrumentation of ours (the switch off), but each save makes the
  SDK calls that ours makes for it, straight: one span started, given its five attributes
  and ended, one histogram point (and, on delivery, a second point). What this mode costs
  is the SDK's own share; "SDK + exporter" minus it is ours.

Figures: versioned saves per second (one coroutine: a chain of CAS updates, each with its
event; and 16 coroutines, a task each), and deliveries per second, one at a time (A saves
an event, B's subscriber receives it, then the next). The ratios to "no OpenTelemetry" are
the overhead. Targets on the development machine: API only at most 3% below, SDK at most 15%.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from a2a.server.cluster import TaskVersion
from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import Task, TaskState, TaskStatus, TaskStatusUpdateEvent
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from a2a_redis import telemetry
from a2a_redis.events.event_stream import RedisTaskEventStream
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from benchmarks.common import Benchmark, Report, RunContext
from benchmarks.event_stream import replica_client

CTX = ServerCallContext()
OFF, API, SDK = "no OpenTelemetry", "API only (no-op)", "SDK + exporter"
BARE = "SDK calls alone"
MODES = (OFF, API, SDK, BARE)
CONCURRENCY = 16
BARE_ATTRIBUTES: dict[str, str | int] = {
    "db.system.name": "redis", "db.operation.name": "save",
    "a2a_redis.round_trips": 2, "a2a_redis.retries": 0, "a2a_redis.conflicts": 0,
}  # fmt: skip
BARE_OUTCOME = {"operation": "save", "outcome": "ok"}
Step = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Sizes:
    seconds: float  # per round
    turns: int  # each turn runs one round of every mode, in a rotating order
    warmup: float


FULL = Sizes(seconds=0.4, turns=40, warmup=0.5)
QUICK = Sizes(seconds=0.25, turns=12, warmup=0.2)


@dataclass
class Paired:
    """Per mode: the median rate, the median of per-turn ratios to OFF, and CPU per op."""

    rate: dict[str, float]
    ratio: dict[str, float]
    cpu_us: dict[str, float]


async def _round(steps: list[Step], seconds: float) -> tuple[int, float, float]:
    """Ops, wall seconds and this process's CPU seconds of one round of ``steps``."""
    wall, cpu = time.perf_counter(), time.process_time()
    stop = wall + seconds

    async def loop(step: Step) -> int:
        count = 0
        while time.perf_counter() < stop:
            await step()
            count += 1
        return count

    ops = sum(await asyncio.gather(*(loop(step) for step in steps)))
    return ops, time.perf_counter() - wall, time.process_time() - cpu


async def measure_paired(workloads: dict[str, list[Step]], sizes: Sizes) -> Paired:
    """Rounds of every mode side by side, ``sizes.turns`` times in rotating order.

    A burst of load from elsewhere on the machine hits the rounds of one turn alike, so
    the ratio of two modes is taken within each turn; the figure is their median.
    """
    for steps in workloads.values():
        await _round(steps, sizes.warmup)
    rates: dict[str, list[float]] = {m: [] for m in workloads}
    cpu: dict[str, list[float]] = {m: [] for m in workloads}
    for turn in range(sizes.turns):
        order = [*MODES[turn % len(MODES) :], *MODES[: turn % len(MODES)]]
        for mode in order:
            gc.collect()
            ops, wall, used = await _round(workloads[mode], sizes.seconds)
            rates[mode].append(ops / wall)
            cpu[mode].append(used / max(ops, 1) * 1e6)
    return Paired(
        rate={m: statistics.median(r) for m, r in rates.items()},
        ratio={
            m: statistics.median(a / b for a, b in zip(rates[m], rates[OFF], strict=True))
            for m in MODES
        },
        cpu_us={m: statistics.median(c) for m, c in cpu.items()},
    )


class Modes:
    """Switches ``a2a_redis.telemetry`` between the three modes (only when it changes)."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(BatchSpanProcessor(self.exporter))
        self.meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
        self.bare_tracer = self.tracers.get_tracer("bare")
        self.bare_histogram = self.meters.get_meter("bare").create_histogram("bare")
        self.current = ""

    def use(self, mode: str) -> None:
        if mode == self.current:
            return
        self.current = mode
        self.exporter.clear()
        if mode in (OFF, BARE):
            telemetry.configure(enabled=False)
        elif mode == API:
            telemetry.configure()  # the global providers: never set here, so the no-ops
        else:
            telemetry.configure(meter_provider=self.meters, tracer_provider=self.tracers)

    def bare(self, points: int = 1) -> None:
        """The SDK calls our instrumentation makes for one save, made straight."""
        span = self.bare_tracer.start_span("bare", None, SpanKind.CLIENT)
        span.set_attributes(BARE_ATTRIBUTES)
        span.end()
        for _ in range(points):
            self.bare_histogram.record(0.001, BARE_OUTCOME)

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

    async def step(self, points: int = 1) -> None:
        self.modes.use(self.mode)
        if self.mode == BARE:
            self.modes.bare(points)
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
        await self.chain.step(points=2)  # (the save's, and the delivery's)
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
            paired = await measure_paired(
                {m: [c.step for c in mine] for m, mine in chains.items()}, sizes
            )
            _report(
                report,
                f"versioned save with its event, {concurrency} coroutine(s)",
                "saves/s",
                paired,
            )
        deliveries = {m: Delivery(Chain(a_store, modes, m, next(ids)), b) for m in MODES}
        for delivery in deliveries.values():
            await delivery.start()
        paired = await measure_paired({m: [d.step] for m, d in deliveries.items()}, sizes)
        title = "cross-replica delivery, one event at a time (A saves, B receives)"
        _report(report, title, "events/s", paired)
    finally:
        for delivery in locals().get("deliveries", {}).values():
            await delivery.stop()
        await b.aclose()
        await a_client.aclose()
        await b_client.aclose()
        modes.close()


def _report(report: Report, title: str, unit: str, paired: Paired) -> None:
    with report.group(title, unit, higher_is_better=True) as group:
        for mode in MODES:
            group.add(mode, paired.rate[mode], anchor=mode == OFF)
    with report.group(title + ": client CPU per operation", "µs", higher_is_better=False) as group:
        for mode in MODES:
            group.add(mode, paired.cpu_us[mode], anchor=mode == OFF)
    costs = {m: (1 - paired.ratio[m]) * 100 for m in (API, SDK, BARE)}
    report.facts.setdefault("overhead_percent", {})[title] = costs
    report.note(
        f"{title}: median per-turn throughput cost, API only {costs[API]:+.1f}%, "
        f"SDK + exporter {costs[SDK]:+.1f}%, the same SDK calls alone (none of ours) "
        f"{costs[BARE]:+.1f}% (negative: faster, within noise)"
    )


BENCHMARK = Benchmark(
    "otel",
    "OpenTelemetry overhead: save and delivery without it, with the API only, with the SDK",
    run,
)
