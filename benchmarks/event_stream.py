"""The event stream: ``RedisTaskEventStream`` delivering task events across replicas.

Two "replicas" live in this one process: A and B, each with its own ``redis.asyncio.Redis``
client (its own pool and connections) and its own store and stream objects on one prefix.
A writes as the SDK does (``store.save(task, event=e, ...)``, then ``stream.publish``); B
consumes ``stream.subscribe(task_id, after=...)``. A delivery's latency runs from just
before A's ``save`` to the moment B's generator yields the event (matched by version). Both
ends share one event loop and the machine's CPUs with the server, so the figures include
that scheduling.

Figures:

1. Cross-replica delivery latency (median, p99) with events paced at a fixed total rate
   over several tasks, each task with one subscriber on B. Anchors: the SDK's
   ``DatabaseTaskEventStream`` (default 0.5 s poll) over ``VersionedDatabaseTaskStore`` on
   SQLite, at a rate SQLite can take, and the raw Redis round trip (PING on A's client).
(Fan-out to 10,000 subscribers: ``benchmarks/fanout.py``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import statistics
import time
import uuid
from array import array
from collections.abc import AsyncGenerator, Awaitable, Iterator, Sequence
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from a2a.server.cluster import (
    DatabaseTaskEventStream,
    TaskEventStream,
    TaskVersion,
    VersionedDatabaseTaskStore,
    VersionedEvent,
    VersionedTaskStore,
)
from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import Task, TaskState, TaskStatus, TaskStatusUpdateEvent
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from sqlalchemy.ext.asyncio import create_async_engine

from a2a_redis.events.event_stream import RedisTaskEventStream
from a2a_redis.log.codec import version_int
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from benchmarks.common import Benchmark, Report, RunContext, measure_latencies, percentile

CTX = ServerCallContext()  # the anonymous user: every task has owner ""
T = TypeVar("T")

REDIS = "redis stream"
SQLITE = "SQLite, 0.5 s poll"
PING = "raw PING"

JOIN_TIMEOUT = 30.0  # seconds for subscribers to receive their first (priming) event
DRAIN_GRACE = 5.0  # seconds after the last send for the remaining deliveries
FAN_SAVE = False  # figure 2: A saves through the store (True) or only publishes (False)


@dataclass(frozen=True)
class Sizes:
    """How long and how big: the full run (about 30 s) or ``--quick`` (about 6 s)."""

    lanes: int  # figure 1: tasks sending in parallel (one subscriber each on B) ...
    rate: float  # ... at this many events/s in total
    sql_lanes: int  # the same for the SQLite anchor
    sql_rate: float
    seconds: float  # sending time per contender and turn
    turns: int  # contenders measured in turns (rotated), the samples pooled
    warmup: float  # events sent in the first seconds of a turn are not counted
    ping_samples: int
    fan_tasks: int  # figure 2: tasks ...
    fan_per_task: int  # ... with this many subscribers each, all on B
    fan_writers: int  # coroutines on A sending events across the tasks, unpaced ...
    fan_seconds: float  # ... for this long
    join_batch: int  # subscribers started at a time (their joins and backlog reads)
    fan_pool: int  # max_connections of B's blocking pool


FULL = Sizes(20, 1000.0, 5, 50.0, 3.0, 2, 0.3, 3000, 1000, 10, 32, 4.0, 50, 100)
QUICK = Sizes(10, 1000.0, 5, 50.0, 1.0, 1, 0.2, 600, 100, 10, 16, 1.0, 50, 100)


# -- two replicas ----------------------------------------------------------------------------
def replica_client(ctx: RunContext, name: str, *, blocking_pool: int = 0) -> Redis:
    """A new client on the run's server, with its own pool; connections named ``name``.

    ``blocking_pool`` > 0 gives a ``BlockingConnectionPool`` of that size (waits for a free
    connection instead of raising); otherwise redis-py's default pool, as ``ctx.redis`` has.
    """
    pool = ctx.redis.connection_pool
    kwargs: dict[str, Any] = {**pool.connection_kwargs, "client_name": name}
    if blocking_pool:
        new_pool: ConnectionPool = BlockingConnectionPool(
            connection_class=pool.connection_class,
            max_connections=blocking_pool,
            timeout=60,
            **kwargs,
        )
    else:
        new_pool = ConnectionPool(connection_class=pool.connection_class, **kwargs)
    return Redis.from_pool(new_pool)


@dataclass
class Replicas:
    """A writer replica (A) and a reader replica (B) of one backend.

    With a store on A, a send is the SDK's path: save with the event, then publish it. With
    none (``store_a`` None), a send is ``stream_a.publish`` alone at the next version.
    """

    label: str
    store_a: VersionedTaskStore | None
    stream_a: TaskEventStream
    stream_b: TaskEventStream

    async def send(
        self, task: Task, event: TaskStatusUpdateEvent, prev: TaskVersion, seq: int
    ) -> TaskVersion:
        """Send the ``seq``-th event of the task (1 for its first) from A."""
        if self.store_a is None:
            version = TaskVersion(seq)
        else:
            version = await self.store_a.save(task, event=event, prev_version=prev, context=CTX)
        await self.stream_a.publish(task.id, VersionedEvent(event=event, version=version))
        return version

    async def version(self, task_id: str, seq: int) -> TaskVersion:
        """The task's version after a failed send."""
        if self.store_a is None:
            return TaskVersion(seq)
        stored = await self.store_a.get(task_id, CTX)
        return TaskVersion.MISSING if stored is None else stored.version

    def subscribe(self, task_id: str) -> AsyncGenerator[VersionedEvent, None]:
        """B's subscription from the start of the task (the priming event included)."""
        return self.stream_b.subscribe(task_id, after=TaskVersion.MISSING)


def redis_replicas(
    client_a: Redis, client_b: Redis, prefix: str, *, store: bool = True
) -> Replicas:
    """Store and stream objects for A and B on one prefix (``store=False``: A publishes only)."""
    store_b = VersionedRedisTaskStore(client_b, prefix=prefix)
    stream_b = RedisTaskEventStream(client_b, task_store=store_b)
    if not store:
        return Replicas(REDIS, None, RedisTaskEventStream(client_a, prefix=prefix), stream_b)
    store_a = VersionedRedisTaskStore(client_a, prefix=prefix)
    return Replicas(REDIS, store_a, RedisTaskEventStream(client_a, task_store=store_a), stream_b)


async def close_replicas(replicas: Replicas) -> None:
    for stream in (replicas.stream_a, replicas.stream_b):
        if isinstance(stream, RedisTaskEventStream):
            await stream.aclose()


# -- tasks, lanes and subscribers ------------------------------------------------------------
def _ms(seconds: float) -> float:
    return seconds * 1000


class GcPauses:
    """Records CPython's full (generation 2) collections while active: they stop the loop."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._start = 0.0
        self._active = False

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if not self._active or info.get("generation") != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._start)

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Count the full collections of the enclosed block (not those it runs itself)."""
        gc.callbacks.append(self._callback)
        self._active = True
        try:
            yield
        finally:
            self._active = False
            gc.callbacks.remove(self._callback)

    def describe(self) -> str:
        if not self.pauses:
            return "no full (gen-2) garbage collection ran"
        if len(self.pauses) == 1:
            return f"1 full (gen-2) garbage collection ran, for {_ms(self.pauses[0]):.0f} ms"
        return (
            f"{len(self.pauses)} full (gen-2) garbage collections ran, the longest "
            f"{_ms(max(self.pauses)):.0f} ms"
        )


class Tally:
    """Counts deliveries; lets the benchmark wait until a number of them has arrived."""

    def __init__(self) -> None:
        self.count = 0
        self._target: int | None = None
        self._reached = asyncio.Event()

    def add(self) -> None:
        self.count += 1
        if self._target is not None and self.count >= self._target:
            self._reached.set()

    async def wait_for(self, target: int, timeout: float) -> bool:
        """Whether ``target`` deliveries arrived within ``timeout`` seconds."""
        self._target = target
        self._reached.clear()
        if self.count >= target:
            return True
        try:
            await asyncio.wait_for(self._reached.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


class Arrivals:
    """Every delivery on B: lane index, version, ``perf_counter()`` when it was yielded.

    Kept in flat arrays, not as Python objects, so that the benchmark's own records do not
    grow the heap the garbage collector walks (and so its pauses) as deliveries pile up.
    """

    def __init__(self) -> None:
        self.lanes = array("l")
        self.versions = array("q")
        self.times = array("d")

    def clear(self) -> None:
        self.lanes = array("l")
        self.versions = array("q")
        self.times = array("d")

    def add(self, lane: int, version: int, when: float) -> None:
        self.lanes.append(lane)
        self.versions.append(version)
        self.times.append(when)

    def __iter__(self) -> Iterator[tuple[int, int, float]]:
        return zip(self.lanes, self.versions, self.times, strict=True)


async def consume(
    gen: AsyncGenerator[VersionedEvent, None], lane: int, arrivals: Arrivals, tally: Tally
) -> None:
    """One subscriber on B: note every event it yields (version 1, the priming, only counts)."""
    async with aclosing(gen):
        async for item in gen:
            now = time.perf_counter()
            version = version_int(item.version)
            if version != 1:
                arrivals.add(lane, version, now)
            tally.add()


class Lane:
    """One task that A moves through status updates (WORKING <-> INPUT_REQUIRED)."""

    def __init__(self, replicas: Replicas, index: int) -> None:
        self.replicas = replicas
        self.index = index
        task_id = str(uuid.uuid4())
        self.task = Task(
            id=task_id,
            context_id=f"ctx-{index % 10}",
            status=TaskStatus(state=TaskState.TASK_STATE_WORKING),
        )
        self.version = TaskVersion.MISSING
        self.sent: dict[int, float] = {}  # version -> perf_counter() before the send
        self.save_s: list[float] = []  # how long each save + publish took on A
        self.steps = 0
        self.errors = 0
        self.last_error = ""

    def _next(self) -> tuple[Task, TaskStatusUpdateEvent]:
        self.steps += 1
        task = Task()
        task.CopyFrom(self.task)
        task.status.state = (
            TaskState.TASK_STATE_INPUT_REQUIRED if self.steps % 2 else TaskState.TASK_STATE_WORKING
        )
        task.status.timestamp.GetCurrentTime()
        event = TaskStatusUpdateEvent(
            task_id=task.id, context_id=task.context_id, status=task.status
        )
        return task, event

    async def create(self) -> Lane:
        """The first save, with its event (version 1): the subscribers' priming event."""
        self.task.status.timestamp.GetCurrentTime()
        event = TaskStatusUpdateEvent(
            task_id=self.task.id, context_id=self.task.context_id, status=self.task.status
        )
        self.version = await self.replicas.send(self.task, event, TaskVersion.MISSING, 1)
        return self

    async def step(self) -> None:
        task, event = self._next()
        start = time.perf_counter()
        try:
            version = await self.replicas.send(task, event, self.version, self.steps + 1)
        except Exception as e:  # counted and shown; the lane re-reads its version, goes on
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"[:200]
            self.version = await self.replicas.version(task.id, self.steps + 1)
            return
        self.save_s.append(time.perf_counter() - start)
        self.sent[version_int(version)] = start
        self.version = version
        self.task = task

    async def paced(self, first: float, interval: float, until: float) -> None:
        """Send at ``first``, ``first + interval``, ... before ``until`` (late: at once)."""
        for k in itertools.count():
            due = first + k * interval
            if due >= until:
                return
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.step()


#: A lane as another process takes it over: index, task (bytes), version, steps taken.
LaneState = tuple[int, bytes, int, int]
#: What that process hands back: sends (version -> time), their durations, errors, state.
LaneResult = tuple[dict[int, float], list[float], int, str, LaneState]


def lane_state(lane: Lane) -> LaneState:
    return lane.index, lane.task.SerializeToString(), version_int(lane.version), lane.steps


def lane_from(replicas: Replicas, state: LaneState) -> Lane:
    """The lane ``state`` describes, sending through ``replicas`` (in another process)."""
    index, task, version, steps = state
    lane = Lane(replicas, index)
    lane.task = Task.FromString(task)
    lane.version, lane.steps = TaskVersion(version), steps
    return lane


def lane_result(lane: Lane) -> LaneResult:
    return lane.sent, lane.save_s, lane.errors, lane.last_error, lane_state(lane)


def merge_result(lane: Lane, result: LaneResult) -> None:
    """Take back a lane that another process moved on (its sends, errors and state)."""
    sent, save_s, errors, last_error, (_, task, version, steps) = result
    lane.sent.update(sent)
    lane.save_s += save_s
    lane.errors += errors
    lane.last_error = last_error or lane.last_error
    lane.task = Task.FromString(task)
    lane.version, lane.steps = TaskVersion(version), steps


async def unpaced(lanes: Sequence[Lane], until: float) -> None:
    """Send on the lanes in turn, back to back, until ``until``."""
    for lane in itertools.cycle(lanes):
        if time.perf_counter() >= until:
            return
        await lane.step()


async def settled(coros: Sequence[Awaitable[T]]) -> list[T]:
    """Like ``asyncio.gather``, but on a failure only once every coroutine has finished.

    So no write is still running when the run's clean-up unlinks the namespace.
    """
    results = await asyncio.gather(*coros, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast("list[T]", results)


async def start_subscribers(
    replicas: Replicas,
    lanes: Sequence[Lane],
    per_lane: int,
    batch: int,
    arrivals: Arrivals,
    tally: Tally,
) -> list[asyncio.Task[None]]:
    """Start ``per_lane`` subscribers on B per lane, ``batch`` at a time; wait until all are live.

    A subscriber is live once it yielded the task's priming event (its join, backlog read
    and first delivery are done). Raises TimeoutError if they are not all live in time.
    """
    tasks: list[asyncio.Task[None]] = []
    pairs = [(lane, k) for lane in lanes for k in range(per_lane)]
    for start in range(0, len(pairs), batch):
        for lane, _ in pairs[start : start + batch]:
            gen = replicas.subscribe(lane.task.id)
            tasks.append(asyncio.ensure_future(consume(gen, lane.index, arrivals, tally)))
        if not await tally.wait_for(len(tasks), JOIN_TIMEOUT):
            await stop(tasks)
            raise TimeoutError(f"{replicas.label}: subscribers not live after {JOIN_TIMEOUT} s")
    return tasks


async def stop(tasks: Sequence[asyncio.Task[None]]) -> list[BaseException]:
    """Cancel the subscribers (each closes its generator); return their unexpected errors."""
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return [r for r in results if isinstance(r, BaseException) and not _cancelled(r)]


def _cancelled(error: BaseException) -> bool:
    return isinstance(error, asyncio.CancelledError)


@dataclass
class Deliveries:
    """What B received of what A sent."""

    latencies: list[float] = field(default_factory=list)  # seconds, sorted
    sent: int = 0
    expected: int = 0  # deliveries: sent x subscribers per task
    delivered: int = 0
    first_send: float = 0.0
    last_send: float = 0.0
    last_arrival: float = 0.0
    save_s: list[float] = field(default_factory=list)
    errors: int = 0
    last_error: str = ""

    def lost(self) -> int:
        return self.expected - self.delivered


def match(
    lanes: Sequence[Lane], per_lane: int, arrivals: Arrivals, counted_from: float
) -> Deliveries:
    """Latency of every delivery of an event sent at or after ``counted_from``."""
    out = Deliveries()
    for lane in lanes:
        counted = [t for t in lane.sent.values() if t >= counted_from]
        out.sent += len(counted)
        out.save_s += lane.save_s
        out.errors += lane.errors
        out.last_error = lane.last_error or out.last_error
        if counted:
            out.first_send = min(out.first_send or counted[0], *counted)
            out.last_send = max(out.last_send, *counted)
    out.expected = out.sent * per_lane
    for lane_index, version, arrived in arrivals:
        sent = lanes[lane_index].sent.get(version)
        if sent is not None and sent >= counted_from:
            out.latencies.append(arrived - sent)
            out.last_arrival = max(out.last_arrival, arrived)
    out.delivered = len(out.latencies)
    out.latencies.sort()
    out.save_s.sort()
    return out


# -- figure 1: cross-replica latency ---------------------------------------------------------
async def paced_turn(
    replicas: Replicas,
    lanes_n: int,
    rate: float,
    seconds: float,
    warmup: float,
    gc_pauses: GcPauses | None = None,
) -> Deliveries:
    """Open ``lanes_n`` tasks with a subscriber each on B; send at ``rate`` for ``seconds``."""
    lanes = await settled([Lane(replicas, i).create() for i in range(lanes_n)])
    arrivals = Arrivals()
    tally = Tally()
    subscribers = await start_subscribers(replicas, lanes, 1, lanes_n, arrivals, tally)
    try:
        gc.collect()
        interval = lanes_n / rate  # each lane sends every `interval` s, the lanes staggered
        begin = time.perf_counter() + 0.01
        until = begin + seconds
        with (gc_pauses or GcPauses()).watch():
            await settled(
                [
                    lane.paced(begin + i * interval / lanes_n, interval, until)
                    for i, lane in enumerate(lanes)
                ]
            )
            sent = sum(len(lane.sent) for lane in lanes)
            await tally.wait_for(lanes_n + sent, DRAIN_GRACE)
    finally:
        errors = await stop(subscribers)
    result = match(lanes, 1, arrivals, begin + warmup)
    if errors:
        result.last_error = f"subscriber failed: {type(errors[0]).__name__}: {errors[0]}"
    return result


@dataclass
class Contender:
    label: str
    replicas: Replicas
    lanes: int
    rate: float
    turns: list[Deliveries] = field(default_factory=list)
    gc_pauses: GcPauses = field(default_factory=GcPauses)

    def pooled(self) -> Deliveries:
        out = Deliveries()
        for turn in self.turns:
            out.latencies += turn.latencies
            out.save_s += turn.save_s
            out.sent += turn.sent
            out.expected += turn.expected
            out.delivered += turn.delivered
            out.errors += turn.errors
            out.last_error = turn.last_error or out.last_error
        out.latencies.sort()
        out.save_s.sort()
        return out


async def sqlite_replicas(ctx: RunContext, stack: AsyncExitStack) -> Replicas:
    """The SDK's anchor: one SQLite file, an engine (a replica) each for A and B."""
    url = f"sqlite+aiosqlite:///{ctx.tmp_dir / 'event_stream.db'}"
    engine_a = create_async_engine(url)
    stack.push_async_callback(engine_a.dispose)
    engine_b = create_async_engine(url)
    stack.push_async_callback(engine_b.dispose)
    store_a = VersionedDatabaseTaskStore(engine_a)
    await store_a.initialize()
    stream_a = DatabaseTaskEventStream(engine_a)
    stream_b = DatabaseTaskEventStream(engine_b)
    await stream_a.initialize()
    await stream_b.initialize()
    return Replicas(SQLITE, store_a, stream_a, stream_b)


async def latency(ctx: RunContext, report: Report, sizes: Sizes) -> None:
    client_a = replica_client(ctx, f"a2a-bench-{ctx.run_id[:12]}-lat-A")
    client_b = replica_client(ctx, f"a2a-bench-{ctx.run_id[:12]}-lat-B")
    async with AsyncExitStack() as stack:
        stack.push_async_callback(client_a.aclose)
        stack.push_async_callback(client_b.aclose)
        redis = redis_replicas(client_a, client_b, ctx.namespace("latency"))
        stack.push_async_callback(close_replicas, redis)
        sqlite = await sqlite_replicas(ctx, stack)
        contenders = [
            Contender(REDIS, redis, sizes.lanes, sizes.rate),
            Contender(SQLITE, sqlite, sizes.sql_lanes, sizes.sql_rate),
        ]
        # untimed warm-up: connections, pub/sub, SQLite tables and statement caches
        for c in contenders:
            await paced_turn(c.replicas, 2, c.rate / c.lanes * 2, 0.2, 0.0)
        for turn in range(sizes.turns):
            shift = turn % len(contenders)
            for c in [*contenders[shift:], *contenders[:shift]]:
                gc.collect()
                c.turns.append(
                    await paced_turn(
                        c.replicas, c.lanes, c.rate, sizes.seconds, sizes.warmup, c.gc_pauses
                    )
                )
        ping = (
            await measure_latencies(
                {PING: client_a.ping}, samples=sizes.ping_samples, budget=sizes.seconds / 2
            )
        )[PING]

    pooled = {c.label: c.pooled() for c in contenders}
    title = (
        f"cross-replica delivery, save on A to yield on B: Redis {sizes.rate:,.0f} events/s "
        f"over {sizes.lanes} tasks, SQLite {sizes.sql_rate:,.0f} events/s over "
        f"{sizes.sql_lanes} tasks"
    )
    with report.group(title, "ms", higher_is_better=False) as group:
        for c in contenders:
            d = pooled[c.label]
            if not d.latencies:
                report.note(f"WARNING: {c.label}: no event was delivered")
                continue
            anchor = c.label != REDIS
            note = f"n={d.delivered}"
            detail = {
                "samples": d.delivered,
                "sent": d.sent,
                "lost": d.lost(),
                "rate_per_s": c.rate,
                "tasks": c.lanes,
                "seconds_per_turn": sizes.seconds,
                "turns": sizes.turns,
                "save_median_ms": _ms(statistics.median(d.save_s)) if d.save_s else None,
                "max_ms": _ms(d.latencies[-1]),
                "gen2_pauses_ms": [_ms(p) for p in c.gc_pauses.pauses],
            }
            med = _ms(statistics.median(d.latencies))
            p99 = _ms(percentile(d.latencies, 99))
            group.add(c.label, med, metric="median", anchor=anchor, note=note, detail=detail)
            group.add(c.label, p99, metric="p99", anchor=anchor, note=note, detail=detail)
        note = f"n={ping.samples}"
        group.add(PING, ping.median_ms, metric="median", anchor=True, note=note)
        group.add(PING, ping.p99_ms, metric="p99", anchor=True, note=note)

    for c in contenders:
        d = pooled[c.label]
        parts = [f"{d.delivered:,} of {d.sent:,} events delivered"]
        if d.save_s:
            parts.append(
                f"A's save + publish took median {_ms(statistics.median(d.save_s)):.2f} ms, "
                f"p99 {_ms(percentile(d.save_s, 99)):.2f} ms of that"
            )
        parts.append(f"while sending, {c.gc_pauses.describe()}")
        if d.errors:
            parts.append(f"{d.errors} sends failed (last: {d.last_error})")
        elif d.last_error:
            parts.append(d.last_error)
        report.note(f"{c.label}: " + "; ".join(parts))
    report.note(
        f"SQLite is paced at {sizes.sql_rate:,.0f} events/s, not {sizes.rate:,.0f}: its "
        "versioned saves (a transaction and commit each, on one database file) are "
        "serialised by the file's write lock, so a few hundred per second at best, and its "
        "delivery latency is set by the 0.5 s poll, not by the rate"
    )


# -- figure 2: fan-out -----------------------------------------------------------------------
async def connections(redis: Redis, name: str) -> tuple[int, int]:
    """(all, pub/sub) connections the server lists under client name ``name``."""
    clients: list[dict[str, Any]] = await redis.client_list()
    mine = [c for c in clients if c.get("name") == name]
    pubsub = [
        c
        for c in mine
        if int(c.get("sub", 0) or 0) or int(c.get("psub", 0) or 0) or "P" in c.get("flags", "")
    ]
    return len(mine), len(pubsub)


# -- the benchmark ---------------------------------------------------------------------------
async def run(ctx: RunContext, report: Report) -> None:
    sizes = QUICK if ctx.quick else FULL
    report.facts["sizes"] = dict(sizes.__dict__)
    report.note(
        "A and B are two clients (two replicas) in this process. A saves each status update "
        "with its event and publishes it (a no-op for both backends, as the stores append "
        "the event); the latency runs from just before A's save to B's generator yielding "
        "the event. raw PING = one round trip on A's client. Ratios are this value / the "
        "anchor's."
    )
    await latency(ctx, report, sizes)


BENCHMARK = Benchmark(
    "event_stream",
    "RedisTaskEventStream cross-replica latency beside the SDK's SQL polling",
    run,
)
