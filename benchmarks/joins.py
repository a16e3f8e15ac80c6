"""Join storms: thousands of subscribers joining at once, as after a deploy or an LB restart.

Replica A creates the tasks (two events each); then, all at once, replica B starts 2,000
subscribers of one task, or 2,000 over 100 tasks (half from the task's start, half after
its first event). Each subscriber is an asyncio task reading ``stream.subscribe`` until its
first event. B's client has redis-py's default pool (at most 100 connections, raising
beyond) or the backend's (a ``BlockingConnectionPool`` of 64).

Figures: the time from the storm's start until every subscriber has its first event
(and the median and p99 of each subscriber's time to its first event), B's Redis
connections (``CLIENT LIST`` by client name; the pool keeps every connection it opened,
so this is the most it used at once), and whether any join failed (``PoolExhaustedError``).
Anchor: a lone subscriber's join on the same client, and a raw PING.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

from a2a.server.cluster import TaskVersion
from a2a.types.a2a_pb2 import Task, TaskState, TaskStatus, TaskStatusUpdateEvent

from a2a_redis.events.event_stream import RedisTaskEventStream
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from benchmarks.common import Benchmark, Report, RunContext, measure_latencies, percentile
from benchmarks.event_stream import CTX, connections, replica_client

MISSING = TaskVersion.MISSING


@dataclass(frozen=True)
class Storm:
    subscribers: int
    tasks: int


FULL = [Storm(2000, 1), Storm(2000, 100)]
QUICK = [Storm(500, 1), Storm(500, 50)]
POOLS = {"redis-py default pool (100)": 0, "backend pool (blocking, 64)": 64}


async def _create(store: VersionedRedisTaskStore, task_id: str) -> None:
    """A task with two events: the Task (version 1) and a WORKING update (version 2)."""
    task = Task(id=task_id, context_id="ctx", status=TaskStatus(state=TaskState.TASK_STATE_WORKING))
    version = await store.save(task, event=task, prev_version=MISSING, context=CTX)
    event = TaskStatusUpdateEvent(task_id=task_id, context_id="ctx", status=task.status)
    await store.save(task, event=event, prev_version=version, context=CTX)


class Held:
    """Counts subscribers that have their first event; holds them until released."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.all_first = asyncio.Event()
        self.release = asyncio.Event()

    def arrived(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.all_first.set()


async def _first(
    stream: RedisTaskEventStream, task_id: str, after: TaskVersion, held: Held | None = None
) -> float:
    """When the subscription's first event arrived (``perf_counter``); with ``held``, the
    subscription stays open until ``held.release``."""
    gen = stream.subscribe(task_id, after=after)
    counted = held is None
    try:
        async for _ in gen:
            when = time.perf_counter()
            if held is not None:
                held.arrived()
                counted = True
                await held.release.wait()
            return when
    finally:
        if not counted:  # failed: counted all the same, so that the others are released
            held.arrived()  # type: ignore[union-attr]
        await gen.aclose()
    raise RuntimeError("the subscription ended before its first event")


@dataclass
class StormResult:
    firsts_ms: list[float]  # each subscriber's time to its first event, sorted
    failures: int
    first_failure: str
    conns: tuple[int, int]  # (all, pub/sub)


async def storm(ctx: RunContext, storm: Storm, pool: int, prefix: str) -> StormResult:
    """One storm on a fresh replica B (so its pool starts empty)."""
    name = f"a2a-bench-{ctx.run_id[:12]}-join-{storm.tasks}-{pool}"
    client_a = replica_client(ctx, f"a2a-bench-{ctx.run_id[:12]}-join-A")
    client_b = replica_client(ctx, name, blocking_pool=pool)
    store_a = VersionedRedisTaskStore(client_a, prefix=prefix)
    stream_b = RedisTaskEventStream(client_b, prefix=prefix)
    try:
        ids = [f"{name}-t{i}" for i in range(storm.tasks)]
        await asyncio.gather(*(_create(store_a, task_id) for task_id in ids))
        await client_b.ping()
        held = Held(storm.subscribers)
        start = time.perf_counter()
        joins = asyncio.gather(
            *(
                _first(stream_b, ids[k % storm.tasks], MISSING if k % 2 else TaskVersion(1), held)
                for k in range(storm.subscribers)
            ),
            return_exceptions=True,
        )
        done = asyncio.ensure_future(held.all_first.wait())
        await asyncio.wait([joins, done], return_when=asyncio.FIRST_COMPLETED)
        conns = await connections(ctx.redis, name)  # every subscriber still subscribed
        held.release.set()
        done.cancel()
        results = await joins
        errors = [r for r in results if isinstance(r, BaseException)]
        firsts = sorted((r - start) * 1000 for r in results if isinstance(r, float))
        first_failure = f"{type(errors[0]).__name__}: {errors[0]}"[:200] if errors else ""
        return StormResult(firsts, len(errors), first_failure, conns)
    finally:
        await stream_b.aclose()
        await client_a.aclose()
        await client_b.aclose()


async def lone_join_ms(ctx: RunContext, prefix: str) -> tuple[float, float]:
    """Median and p99 of one subscriber's join to its first event, and of a raw PING."""
    client = replica_client(ctx, f"a2a-bench-{ctx.run_id[:12]}-join-lone")
    store = VersionedRedisTaskStore(client, prefix=prefix)
    stream = RedisTaskEventStream(client, task_store=store)
    try:
        await _create(store, "lone")

        async def join() -> None:
            await _first(stream, "lone", TaskVersion(1))

        lat = await measure_latencies({"join": join, "ping": client.ping}, samples=200, budget=2.0)
        return lat["join"].median_ms, lat["ping"].median_ms
    finally:
        await stream.aclose()
        await client.aclose()


async def run(ctx: RunContext, report: Report) -> None:
    storms = QUICK if ctx.quick else FULL
    prefix = ctx.namespace("joins")
    lone, ping = await lone_join_ms(ctx, prefix)
    report.facts["lone_join_median_ms"] = lone
    report.facts["ping_median_ms"] = ping
    for s in storms:
        title = f"join storm: {s.subscribers:,} subscribers over {s.tasks} task(s) at once"
        measured = {label: await storm(ctx, s, pool, prefix) for label, pool in POOLS.items()}
        with report.group(title + ", time to first event", "ms", higher_is_better=False) as g:
            g.add("lone join", lone, metric="median", anchor=True)
            g.add("raw PING", ping, metric="median", anchor=True)
            for label, r in measured.items():
                if not r.firsts_ms:
                    continue
                note = f"n={len(r.firsts_ms)}"
                g.add(label, statistics.median(r.firsts_ms), metric="median", note=note)
                g.add(label, percentile(r.firsts_ms, 99), metric="p99", note=note)
                g.add(label, r.firsts_ms[-1], metric="all", note=note)
        with report.group(title + ", B's connections", "conns", higher_is_better=False) as g:
            for label, r in measured.items():
                g.add(label, r.conns[0] - r.conns[1], metric="command")
                g.add(label, r.conns[1], metric="pub/sub")
        for label, r in measured.items():
            if r.failures:
                report.note(f"{title}, {label}: {r.failures} joins FAILED ({r.first_failure})")
            else:
                report.note(f"{title}, {label}: every join succeeded")
    report.note(
        "'all' is the time until every subscriber had its first event, from the storm's "
        "start; B's connections are counted while every subscriber is still subscribed "
        "(the pool keeps every connection it opened: this is the most it used at once)"
    )


BENCHMARK = Benchmark("joins", "join storms: 2,000 subscribers joining one or 100 tasks", run)
