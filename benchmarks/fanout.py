"""Fan-out: 10,000 subscribers over 1,000 tasks, with and without GC tuning.

Replica B holds 10,000 subscribers over 1,000 tasks (10 per task), all through one
``RedisTaskEventStream`` (one listener, one pub/sub connection), while writers on replica
A publish events across the tasks as fast as they can (``publish`` on a stream without a
store, the cheapest writer; ``FAN_SAVE`` in ``event_stream.py`` switches to save +
publish). A and B share this process's event loop.

Four phases over the same subscribers, in one run: CPython's default garbage collection; the
same with A's writers in a process of their own (spawned; so B's event loop does only B's
work, and the figures are B's capacity, not the two replicas' sharing one core); then, A
back in this loop, after ``gc.freeze()`` (the optional tuning the README describes: freeze
once the process reached its steady state, so full collections walk only what came later);
then, also optional, the freeze with a generation-0 threshold of :data:`GEN0_THRESHOLD`
instead of 700 (young collections, each of which walks every young subscriber's objects, run
70 times less often). Each phase reports deliveries per second, this process's CPU time per
delivery (less diluted than the rate by other processes on a shared machine), delivery
latency (median, p99), and every full (generation 2) collection's pause while publishing
(``gc.callbacks`` timing). Phases run in that order: a later one may run on a busier
machine, so compare phases by their CPU time per delivery, or across runs. Also: the Redis
connections B's client holds (``CLIENT LIST`` by client name), memory per subscriber
(tracemalloc) and ``listener.stats()``. ``--quick``: 1,000 subscribers over 100 tasks.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import time
import tracemalloc
from contextlib import AsyncExitStack
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from a2a.types.a2a_pb2 import TaskState
from redis.asyncio import Redis

from a2a_redis.events.event_stream import RedisTaskEventStream
from benchmarks.common import Benchmark, Report, RunContext, percentile
from benchmarks.event_stream import (
    DRAIN_GRACE,
    FAN_SAVE,
    FULL,
    QUICK,
    Arrivals,
    Deliveries,
    GcPauses,
    Lane,
    LaneState,
    Replicas,
    Sizes,
    Tally,
    close_replicas,
    connections,
    lane_from,
    lane_result,
    lane_state,
    match,
    merge_result,
    redis_replicas,
    replica_client,
    settled,
    start_subscribers,
    stop,
    unpaced,
)

DEFAULT_GC = "default GC"
FROZEN = "gc.freeze() after joining"
APART = "A in another process"  # (default GC) B's loop does only B's work: its capacity
#: The optional tuning the README gives beside the freeze: young collections 70x rarer.
GEN0_THRESHOLD = 50_000
TUNED = f"gc.freeze() + gc.set_threshold({GEN0_THRESHOLD:,})"


def _ms(seconds: float) -> float:
    return seconds * 1000


def _in_package(filename: str) -> bool:
    return Path(filename).parent.name == "a2a_redis"


def timed_gc() -> float:
    """Seconds a full ``gc.collect()`` takes now (the pause a gen-2 collection causes)."""
    start = time.perf_counter()
    gc.collect()
    return time.perf_counter() - start


def _settled_lane(replicas: Replicas, index: int) -> Lane:
    """A lane whose first event asks for input: a task whose subscribers expect no owner
    until it runs again (joining 10,000 subscribers can take longer than a lease on a busy
    machine, and a WORKING task silent that long has, rightly, lost its owner)."""
    lane = Lane(replicas, index)
    lane.task.status.state = TaskState.TASK_STATE_INPUT_REQUIRED
    return lane


@dataclass
class Phase:
    """One publishing phase's deliveries and full-collection pauses."""

    label: str
    deliveries: Deliveries
    pauses: GcPauses
    stats: dict[str, int | bool]
    conns: tuple[int, int]
    full_gc_s: float  # a full gc.collect() just before publishing (after the freeze)
    tracked: int  # objects the collector walks then (len(gc.get_objects()))
    cpu_s: float  # this process's CPU time (user + system) while publishing and draining

    def rate(self) -> float:
        d = self.deliveries
        span = (d.last_arrival or time.perf_counter()) - d.first_send
        return d.delivered / span if span > 0 else 0.0

    def cpu_per_delivery(self) -> float:
        """Process CPU seconds per delivery: A's sends and B's fan-out together."""
        return self.cpu_s / max(self.deliveries.delivered, 1)

    def send_rate(self) -> float:
        d = self.deliveries
        return d.sent / max(d.last_send - d.first_send, 1e-9)


def _writer_main(
    server: dict[str, Any], prefix: str, states: list[LaneState], sizes: Sizes, pipe: Connection
) -> None:
    """Replica A in a process of its own: the lanes' sends, unpaced, when the parent says go."""
    asyncio.run(_write_apart(server, prefix, states, sizes, pipe))


async def _write_apart(
    server: dict[str, Any], prefix: str, states: list[LaneState], sizes: Sizes, pipe: Connection
) -> None:
    client = Redis(**server)
    stream = RedisTaskEventStream(client, prefix=prefix)
    replicas = Replicas("redis stream", None, stream, stream)
    lanes = [lane_from(replicas, state) for state in states]
    try:
        pipe.send("ready")
        begin = pipe.recv()
        writers = [lanes[w :: sizes.fan_writers] for w in range(sizes.fan_writers)]
        await settled([unpaced(mine, begin + sizes.fan_seconds) for mine in writers])
        pipe.send([lane_result(lane) for lane in lanes])
    finally:
        await stream.aclose()
        await client.aclose()


async def apart_phase(lanes: list[Lane], sizes: Sizes, ctx: RunContext) -> float:
    """Run A's sends in another process (spawned, so nothing of this loop is shared).

    Returns when it has sent; its lanes' records are merged into ``lanes``. Send times are
    ``perf_counter()`` (CLOCK_MONOTONIC on Linux: one clock for both processes).
    """
    kwargs = ctx.redis.connection_pool.connection_kwargs
    server = {k: kwargs[k] for k in ("host", "port", "unix_socket_path", "db") if k in kwargs}
    if "path" in kwargs:
        server["unix_socket_path"] = kwargs["path"]
    states = [lane_state(lane) for lane in lanes]
    here, there = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=_writer_main, args=(server, ctx.namespace("fanout"), states, sizes, there)
    )
    process.start()
    there.close()  # so that a writer process that dies ends our recv() (EOFError), not hangs
    try:
        await asyncio.to_thread(here.recv)  # "ready": imported, connected
        begin = time.perf_counter() + 0.01
        here.send(begin)
        results = await asyncio.to_thread(here.recv)
        for lane, result in zip(lanes, results, strict=True):
            merge_result(lane, result)
    finally:
        here.close()
        await asyncio.to_thread(process.join, 30)
        if process.is_alive():
            process.kill()
    return begin


async def publish_phase(
    label: str,
    lanes: list[Lane],
    sizes: Sizes,
    arrivals: Arrivals,
    tally: Tally,
    stream_b: RedisTaskEventStream,
    ctx: RunContext,
    name_b: str,
) -> Phase:
    """Publish unpaced across the lanes for ``fan_seconds``; wait for the deliveries."""
    subs = sizes.fan_tasks * sizes.fan_per_task
    arrivals.clear()

    if label in (FROZEN, TUNED):
        gc.collect()
        gc.freeze()  # what survived so far is never walked again
    if label == TUNED:
        gc.set_threshold(GEN0_THRESHOLD, *gc.get_threshold()[1:])
    full_gc = timed_gc()  # the pause of a full collection now
    tracked = len(gc.get_objects())
    pauses = GcPauses()
    writers = [lanes[w :: sizes.fan_writers] for w in range(sizes.fan_writers)]
    begin = time.perf_counter()
    cpu = time.process_time()
    with pauses.watch():
        if label == APART:
            begin = await apart_phase(lanes, sizes, ctx)
        else:
            await settled([unpaced(mine, begin + sizes.fan_seconds) for mine in writers])
        sent = sum(len(lane.sent) for lane in lanes)
        await tally.wait_for(subs + sent * sizes.fan_per_task, DRAIN_GRACE)
    cpu_s = time.process_time() - cpu
    stats = stream_b.listener.stats()
    conns = await connections(ctx.redis, name_b)
    d = match(lanes, sizes.fan_per_task, arrivals, begin)
    return Phase(label, d, pauses, stats, conns, full_gc, tracked, cpu_s)


def report_cpu(report: Report, phases: list[Phase]) -> None:
    """Process CPU time per delivery: a figure that other processes' load dilutes less."""
    with report.group(
        "fan-out: this process's CPU time per delivery (A's sends and B's deliveries, "
        "one event loop; unlike the rate, not diluted by other processes on the machine)",
        "µs",
        higher_is_better=False,
    ) as group:
        for p in phases:
            detail = {"cpu_s": p.cpu_s, "deliveries": p.deliveries.delivered}
            anchor = p.label == DEFAULT_GC
            group.add(p.label, p.cpu_per_delivery() * 1e6, anchor=anchor, detail=detail)


async def fan_out(ctx: RunContext, report: Report, sizes: Sizes) -> None:
    subs = sizes.fan_tasks * sizes.fan_per_task
    name_b = f"a2a-bench-{ctx.run_id[:12]}-fan-B"
    client_a = replica_client(ctx, f"a2a-bench-{ctx.run_id[:12]}-fan-A")
    client_b = replica_client(ctx, name_b, blocking_pool=sizes.fan_pool)
    subscribers: list[asyncio.Task[None]] = []
    phases: list[Phase] = []
    thresholds = gc.get_threshold()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(client_a.aclose)
        stack.push_async_callback(client_b.aclose)
        replicas = redis_replicas(client_a, client_b, ctx.namespace("fanout"), store=FAN_SAVE)
        stack.push_async_callback(close_replicas, replicas)
        stream_b = replicas.stream_b
        assert isinstance(stream_b, RedisTaskEventStream)

        lanes: list[Lane] = []
        for start in range(0, sizes.fan_tasks, 64):
            batch = range(start, min(start + 64, sizes.fan_tasks))
            lanes += await settled([_settled_lane(replicas, i).create() for i in batch])
        conns_before = await connections(ctx.redis, name_b)

        arrivals = Arrivals()
        tally = Tally()
        gc_before = timed_gc()
        tracemalloc.start()
        try:
            base = tracemalloc.take_snapshot()
            joined_at = time.perf_counter()
            subscribers = await start_subscribers(
                replicas, lanes, sizes.fan_per_task, sizes.join_batch, arrivals, tally
            )
            joined_s = time.perf_counter() - joined_at
            gc.collect()
            grown = tracemalloc.take_snapshot().compare_to(base, "filename")
        finally:
            tracemalloc.stop()
        memory = sum(d.size_diff for d in grown)
        in_lib = sum(d.size_diff for d in grown if _in_package(d.traceback[0].filename))
        del base, grown  # the snapshots are large: not to be walked by the collector
        try:
            conns_joined = await connections(ctx.redis, name_b)
            stats_joined = stream_b.listener.stats()
            # close the pool's idle connections (opened by the joins), so that the count
            # below is what the live fan-out itself needs
            await client_b.connection_pool.disconnect(inuse_connections=False)
            for label in (DEFAULT_GC, APART, FROZEN, TUNED):
                phases.append(
                    await publish_phase(label, lanes, sizes, arrivals, tally, stream_b, ctx, name_b)
                )
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
            errors = await stop(subscribers)

    how = "save + publish" if FAN_SAVE else "publish"
    title = (
        f"fan-out: {subs:,} subscribers on B ({sizes.fan_per_task} per task, "
        f"{sizes.fan_tasks:,} tasks, one RedisTaskEventStream); {sizes.fan_writers} "
        f"coroutines on A {how} across the tasks, unpaced, for {sizes.fan_seconds:g} s"
    )
    with report.group(title, "/s", higher_is_better=True) as group:
        for p in phases:
            d = p.deliveries
            detail = {"events": d.sent, "deliveries": d.delivered, "lost": d.lost()}
            anchor = p.label == DEFAULT_GC
            group.add(p.label, p.rate(), metric="deliveries", anchor=anchor, detail=detail)
            group.add(p.label, p.send_rate(), metric="events", anchor=anchor)
    report_cpu(report, phases)
    with report.group(
        f"fan-out delivery latency at that load, {how} on A to yield on B",
        "ms",
        higher_is_better=False,
    ) as group:
        for p in phases:
            d = p.deliveries
            if not d.latencies:
                continue
            note = f"n={d.delivered}"
            detail = {"max_ms": _ms(d.latencies[-1])}
            for metric, q in (("median", 50), ("p99", 99)):
                value = _ms(percentile(d.latencies, q))
                anchor = p.label == DEFAULT_GC
                group.add(p.label, value, metric=metric, note=note, anchor=anchor, detail=detail)
    with report.group(
        "fan-out: longest full (gen-2) GC pause while publishing", "ms", higher_is_better=False
    ) as group:
        for p in phases:
            longest = _ms(max(p.pauses.pauses)) if p.pauses.pauses else 0.0
            detail = {"pauses_ms": [_ms(x) for x in p.pauses.pauses]}
            note = f"{len(p.pauses.pauses)} runs"
            group.add(p.label, longest, anchor=p.label == DEFAULT_GC, note=note, detail=detail)
            group.add(p.label, _ms(p.full_gc_s), metric="collect", anchor=p.label == DEFAULT_GC)
    with report.group(
        f"replica B's Redis connections (CLIENT LIST, name {name_b})",
        "conns",
        higher_is_better=False,
    ) as group:
        group.add("before subscribing", conns_before[0], metric="all")
        group.add(f"{subs:,} subscribed", conns_joined[0], metric="all")
        group.add(f"{subs:,} subscribed", conns_joined[1], metric="pub/sub")
        for p in phases:
            group.add(f"publishing, {p.label}", p.conns[0], metric="all")
    with report.group(
        "memory per subscriber on B (tracemalloc snapshot difference / subscribers)",
        "bytes",
        higher_is_better=False,
    ) as group:
        detail = {"subscribers": subs, "tasks": sizes.fan_tasks}
        group.add("all", memory / subs, detail={**detail, "total_bytes": memory})
        group.add("in a2a_redis code", in_lib / subs, detail={**detail, "total_bytes": in_lib})

    report.facts["fan_out"] = {
        "listener_stats": {"subscribed": stats_joined, **{p.label: p.stats for p in phases}},
        "subscribe_seconds": joined_s,
        "full_gc_ms": {"before subscribing": _ms(gc_before)}
        | {p.label: _ms(p.full_gc_s) for p in phases},
        "gen2_pauses_while_publishing_ms": {
            p.label: [_ms(x) for x in p.pauses.pauses] for p in phases
        },
        "writes": how,
        "b_pool": f"BlockingConnectionPool(max_connections={sizes.fan_pool})",
    }
    for p in phases:
        d = p.deliveries
        report.note(
            f"{p.label}: A sent {d.sent:,} events; B delivered {d.delivered:,} of "
            f"{d.expected:,} expected, the last "
            f"{_ms(max(d.last_arrival - d.last_send, 0.0)):.0f} ms after the last send; "
            f"while publishing, {p.pauses.describe()}; a full gc.collect() before it took "
            f"{_ms(p.full_gc_s):.0f} ms, over {p.tracked:,} objects"
        )
        if d.errors:
            report.note(f"WARNING: {p.label}: {d.errors} sends failed (last: {d.last_error})")
    report.note(
        f"subscribing {subs:,} took {joined_s:.1f} s ({subs / joined_s:,.0f}/s, "
        f"{sizes.join_batch} at a time) under tracemalloc, which slows Python several-fold; "
        f"a full gc.collect() took {_ms(gc_before):.0f} ms before subscribing. A and B share "
        "this process's event loop (one CPU), except in the phase with A in another process: "
        "the rate is where the two together saturate it, and the latency is mostly queueing "
        "in that loop"
    )
    if errors:
        report.note(f"WARNING: {len(errors)} subscribers failed (first: {errors[0]!r})")


async def run(ctx: RunContext, report: Report) -> None:
    sizes = QUICK if ctx.quick else FULL
    report.facts["sizes"] = dict(sizes.__dict__)
    await fan_out(ctx, report, sizes)


BENCHMARK = Benchmark(
    "fanout", "10,000 subscribers on one replica, default GC, gc.freeze(), a gen-0 threshold", run
)
