"""The queue manager: ``RedisQueueManager`` taps across replicas beside ``InMemoryQueueManager``.

Two "replicas" live in this one process: A and B, each with its own ``redis.asyncio.Redis``
client (its own pool and connections) and its own ``RedisQueueManager`` on one prefix. A
owns the task's queue (``create_or_tap``) and enqueues; B opens remote taps with
``tap(task_id)``. Every event carries its sequence number in ``metadata["seq"]``; a tap's
consumer calls ``dequeue_event()`` then ``task_done()`` and checks that the numbers arrive
in order, once each. The owner's own queue is drained concurrently by its own consumer (it
holds 1,024 events, then blocks the producer; and a graceful close waits until it is
drained). Both ends share one event loop and the machine's CPUs with the server.

The anchor is the SDK's ``InMemoryQueueManager``, the same calls on one manager: its taps
are in-process child queues of the owner's queue.

Figures:

1. Throughput through one queue with 1 tap and with 100 taps (all on B, one manager and one
   ``StreamListener``): one producer coroutine on A enqueues a fixed number of events as
   fast as it can; the time runs from the first ``enqueue_event`` until every tap has
   received every event. Events per second, and deliveries per second (events x taps).
   During a 100-tap round: B's Redis connections (``CLIENT LIST`` filtered by B's client
   name) and ``listener.stats()``.
2. Per-event latency, from just before ``enqueue_event`` on A to ``dequeue_event`` returning
   on B's tap (median, p99), with events paced at a moderate rate and 1 tap. Anchors: the
   in-memory local tap, and the raw Redis round trip (PING on A's client).
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
import uuid
from array import array
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from a2a.server.events import InMemoryQueueManager
from a2a.server.events.event_queue import EventQueueLegacy
from a2a.server.events.queue_manager import QueueManager
from a2a.types.a2a_pb2 import TaskState, TaskStatus, TaskStatusUpdateEvent
from a2a.utils._async_queue_compat import QueueShutDown
from redis.asyncio import Redis

from a2a_redis.events.listener import StreamListener
from a2a_redis.events.queue_manager import RedisQueueManager
from a2a_redis.log.keys import Keys
from benchmarks.common import (
    Benchmark,
    Report,
    RunContext,
    fmt_value,
    measure_latencies,
    percentile,
)
from benchmarks.event_stream import GcPauses, connections, replica_client

REDIS = "RedisQueueManager"
MEMORY = "InMemoryQueueManager"
PING = "raw PING"

DRAIN_TIMEOUT = 30.0  # seconds for the taps to receive every event of a round
CLOSE_TIMEOUT = 10.0  # seconds for a close to end every consumer
POOL = 64  # each replica's BlockingConnectionPool, as RedisBackend.from_url makes it


@dataclass(frozen=True)
class Sizes:
    """How long and how big: the full run (about 35 s) or ``--quick`` (about 7 s)."""

    taps: tuple[int, ...]  # figure 1: taps per queue ...
    events: tuple[int, ...]  # ... and the events enqueued per round with that many taps
    rounds: int  # figure 1: rounds per contender (in turns, rotated); the median is shown
    rate: float  # figure 2: events per second, paced ...
    seconds: float  # ... for this long per contender and turn
    turns: int  # contenders measured in turns, the samples pooled
    warmup: float  # events sent in the first seconds of a turn are not counted
    ping_samples: int


FULL = Sizes((1, 100), (4000, 600), 3, 1000.0, 3.0, 2, 0.2, 2000)
QUICK = Sizes((1, 100), (1000, 150), 1, 1000.0, 1.0, 1, 0.1, 500)


def _ms(seconds: float) -> float:
    return seconds * 1000


def make_events(task_id: str, count: int) -> list[TaskStatusUpdateEvent]:
    """``count`` WORKING status updates of the task, ``metadata["seq"]`` 0, 1, ..."""
    status = TaskStatus(state=TaskState.TASK_STATE_WORKING)
    status.timestamp.GetCurrentTime()
    return [
        TaskStatusUpdateEvent(
            task_id=task_id, context_id="ctx-bench", status=status, metadata={"seq": seq}
        )
        for seq in range(count)
    ]


# -- the contenders --------------------------------------------------------------------------
@dataclass
class Contender:
    """Where the owner's queue lives (``owner``) and where taps are opened (``reader``)."""

    label: str
    owner: QueueManager
    reader: QueueManager
    gc_pauses: GcPauses = field(default_factory=GcPauses)

    async def open(
        self, task_id: str, taps: int
    ) -> tuple[EventQueueLegacy, list[EventQueueLegacy]]:
        """The owner's new queue for ``task_id`` and ``taps`` taps of it (opened concurrently)."""
        queue = await self.owner.create_or_tap(task_id)
        opened = await asyncio.gather(*(self.reader.tap(task_id) for _ in range(taps)))
        tapped = [t for t in opened if t is not None]
        if len(tapped) != taps:
            raise RuntimeError(f"{self.label}: {taps - len(tapped)} taps of {task_id} were None")
        return queue, tapped


class Probe:
    """Hooks into one round: after its taps are open, and once half its events are sent."""

    async def opened(self) -> None:
        """Called with the taps open, before the first event."""

    async def sending(self) -> None:
        """Called (concurrently with the producer) once half the events are sent."""


# -- one round -------------------------------------------------------------------------------
class Receipts:
    """What the taps received: counts, when the last tap got the last event, disorder."""

    def __init__(self, taps: int, expected: int, *, timed: bool = False) -> None:
        self.expected = expected
        self.remaining = taps
        self.all_in = asyncio.Event()
        self.last = 0.0
        self.received = 0
        self.disorder = 0  # events that did not arrive as the tap's next sequence number
        # with ``timed``: perf_counter() of each event's arrival, by sequence number
        self.times = array("d", bytes(8 * expected)) if timed else None

    def complete(self, when: float) -> None:
        self.last = max(self.last, when)
        self.remaining -= 1
        if self.remaining == 0:
            self.all_in.set()


async def drain(queue: EventQueueLegacy) -> int:
    """The owner's own consumer: dequeue until the queue is closed and empty."""
    count = 0
    while True:
        try:
            await queue.dequeue_event()
        except QueueShutDown:
            return count
        queue.task_done()
        count += 1


async def consume(queue: EventQueueLegacy, receipts: Receipts) -> int:
    """One tap's consumer: dequeue, ``task_done``, check the sequence number, note the time."""
    count = 0
    times = receipts.times
    while True:
        try:
            event = await queue.dequeue_event()
        except QueueShutDown:
            return count
        now = time.perf_counter()
        queue.task_done()
        seq = int(event.metadata["seq"])  # type: ignore[union-attr]
        if seq != count:
            receipts.disorder += 1
        if times is not None and 0 <= seq < len(times):
            times[seq] = now
        count += 1
        receipts.received += 1
        if count == receipts.expected:
            receipts.complete(now)


@dataclass
class Round:
    """One round: how many events were sent to how many taps, when, and what arrived."""

    events: int
    taps: int
    first_send: float
    last_send: float
    receipts: Receipts
    complete: bool
    sent: array[float] | None = None  # paced rounds: perf_counter() before each enqueue
    enqueue_s: list[float] = field(default_factory=list)  # paced rounds: each enqueue_event

    @property
    def seconds(self) -> float:
        """From the first send until the last tap received the last event."""
        end = self.receipts.last if self.complete else self.last_send
        return max(end - self.first_send, 1e-9)

    @property
    def lost(self) -> int:
        return self.events * self.taps - self.receipts.received

    def latencies(self, counted_from: float) -> list[float]:
        """Seconds from send to receipt of every event sent at or after ``counted_from``."""
        times, sent = self.receipts.times, self.sent
        if times is None or sent is None:
            return []
        return [r - s for s, r in zip(sent, times, strict=True) if s >= counted_from and r > 0]


async def _finish(
    contender: Contender,
    task_id: str,
    owner: asyncio.Task[int],
    consumers: Sequence[asyncio.Task[int]],
) -> None:
    """Close the owner's queue gracefully (its taps end once drained); end every consumer."""
    tasks = [owner, *consumers]
    try:
        await asyncio.wait_for(contender.owner.close(task_id), CLOSE_TIMEOUT)
        await asyncio.wait_for(asyncio.gather(*tasks), CLOSE_TIMEOUT)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _all_in(receipts: Receipts) -> bool:
    try:
        await asyncio.wait_for(receipts.all_in.wait(), DRAIN_TIMEOUT)
    except asyncio.TimeoutError:
        return False
    return True


async def flood(contender: Contender, taps: int, events: int, probe: Probe | None = None) -> Round:
    """Enqueue ``events`` back to back into a new queue with ``taps`` taps; wait for all."""
    task_id = f"flood-{uuid.uuid4().hex}"
    batch = make_events(task_id, events)
    queue, tapped = await contender.open(task_id, taps)
    receipts = Receipts(taps, events)
    owner = asyncio.ensure_future(drain(queue))
    consumers = [asyncio.ensure_future(consume(t, receipts)) for t in tapped]
    probing: asyncio.Future[None] | None = None
    try:
        if probe is not None:
            await probe.opened()
        gc.collect()
        half = events // 2
        with contender.gc_pauses.watch():
            first = time.perf_counter()
            for seq, event in enumerate(batch):
                if seq == half and probe is not None:
                    probing = asyncio.ensure_future(probe.sending())
                await queue.enqueue_event(event)
            last = time.perf_counter()
            complete = await _all_in(receipts)
        if probing is not None:
            await probing
    finally:
        if probing is not None and not probing.done():
            probing.cancel()
        await _finish(contender, task_id, owner, consumers)
    return Round(events, taps, first, last, receipts, complete)


async def paced(contender: Contender, rate: float, seconds: float) -> Round:
    """Enqueue at ``rate`` events/s for ``seconds`` into a new queue with one tap."""
    task_id = f"paced-{uuid.uuid4().hex}"
    count = max(1, int(rate * seconds))
    batch = make_events(task_id, count)
    queue, tapped = await contender.open(task_id, 1)
    receipts = Receipts(1, count, timed=True)
    owner = asyncio.ensure_future(drain(queue))
    consumers = [asyncio.ensure_future(consume(tapped[0], receipts))]
    sent = array("d", bytes(8 * count))
    enqueue_s: list[float] = []
    try:
        gc.collect()
        interval = 1 / rate
        begin = time.perf_counter() + 0.01
        with contender.gc_pauses.watch():
            for seq, event in enumerate(batch):
                delay = begin + seq * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                start = time.perf_counter()
                sent[seq] = start
                await queue.enqueue_event(event)
                enqueue_s.append(time.perf_counter() - start)
            last = time.perf_counter()
            complete = await _all_in(receipts)
    finally:
        await _finish(contender, task_id, owner, consumers)
    return Round(count, 1, begin, last, receipts, complete, sent, enqueue_s)


# -- figure 1: throughput --------------------------------------------------------------------
class ConnectionProbe(Probe):
    """B's connections, listener and manager stats during one 100-tap round."""

    def __init__(
        self,
        ctx: RunContext,
        name: str,
        client: Redis,
        b: RedisQueueManager,
        listener: StreamListener,
    ) -> None:
        self.ctx, self.name, self.client, self.b, self.listener = ctx, name, client, b, listener
        self.rows: list[tuple[str, str, int]] = []
        self.stats: dict[str, Any] = {}
        self.commands: dict[str, int] = {}
        self._calls: dict[str, int] = {}

    async def opened(self) -> None:
        conns, pubsub = await connections(self.ctx.redis, self.name)
        self.rows += [("taps open", "all", conns), ("taps open", "pub/sub", pubsub)]
        self.stats["taps open"] = {"listener": self.listener.stats(), "manager": self.b.stats()}
        # close the pool's idle connections (opened by the concurrent taps), so that the
        # count while sending is what the live delivery itself needs
        await self.client.connection_pool.disconnect(inuse_connections=False)
        self._calls = await command_calls(self.ctx.redis)

    async def sending(self) -> None:
        conns, pubsub = await connections(self.ctx.redis, self.name)
        self.rows += [("sending", "all", conns), ("sending", "pub/sub", pubsub)]
        self.stats["sending"] = {"listener": self.listener.stats(), "manager": self.b.stats()}

    async def after(self) -> None:
        calls = await command_calls(self.ctx.redis)
        self.commands = {
            name: n - self._calls.get(name, 0)
            for name, n in sorted(calls.items())
            if n > self._calls.get(name, 0)
        }
        self.stats["closed"] = {"listener": self.listener.stats(), "manager": self.b.stats()}


async def command_calls(redis: Redis) -> dict[str, int]:
    """Calls per command so far, server-wide (INFO commandstats)."""
    info: dict[str, Any] = await redis.info("commandstats")
    out = {}
    for name, stats in info.items():
        if isinstance(stats, dict) and "calls" in stats:
            out[name.removeprefix("cmdstat_")] = int(stats["calls"])
    return out


async def throughput(
    report: Report, sizes: Sizes, contenders: Sequence[Contender], probe: ConnectionProbe
) -> None:
    for c in contenders:  # untimed warm-up: connections, pub/sub, scripts, code paths
        await flood(c, 1, 200)
        await flood(c, 10, 50)
    results: dict[tuple[str, int], list[Round]] = {}
    probed = False
    for taps, events in zip(sizes.taps, sizes.events, strict=True):
        for turn in range(sizes.rounds):
            shift = turn % len(contenders)
            for c in [*contenders[shift:], *contenders[:shift]]:
                use = c.label == REDIS and taps == max(sizes.taps) and not probed
                results.setdefault((c.label, taps), []).append(
                    await flood(c, taps, events, probe if use else None)
                )
                if use:
                    probed = True
                    await probe.after()

    for taps, events in zip(sizes.taps, sizes.events, strict=True):
        where = "B, one manager" if taps > 1 else "B"
        title = (
            f"throughput, {taps} tap{'s' if taps > 1 else ''} on {where} (in-memory: local): "
            f"A enqueues {events:,} events back to back, timed until every tap has every event"
        )
        with report.group(title, "/s", higher_is_better=True) as group:
            for c in contenders:
                rounds = results[(c.label, taps)]
                rates = [r.events / r.seconds for r in rounds]
                detail = {
                    "events": events,
                    "taps": taps,
                    "rounds_events_per_s": rates,
                    "send_seconds": [r.last_send - r.first_send for r in rounds],
                    "seconds": [r.seconds for r in rounds],
                    "lost": sum(r.lost for r in rounds),
                    "disorder": sum(r.receipts.disorder for r in rounds),
                    "complete": all(r.complete for r in rounds),
                }
                anchor = c.label != REDIS
                note = f"n={events:,}"
                rate = statistics.median(rates)
                group.add(c.label, rate, metric="events", anchor=anchor, note=note, detail=detail)
                if taps > 1:
                    group.add(c.label, rate * taps, metric="deliv.", anchor=anchor, note=note)
        for c in contenders:
            rounds = results[(c.label, taps)]
            send = statistics.median(
                r.events / max(r.last_send - r.first_send, 1e-9) for r in rounds
            )
            tail = statistics.median(max(r.receipts.last - r.last_send, 0.0) for r in rounds)
            parts = [
                f"the enqueue loop ran at {fmt_value(send)} events/s; the last tap got the "
                f"last event {_ms(tail):.0f} ms after the last enqueue "
                + (f"(medians of {len(rounds)} rounds)" if len(rounds) > 1 else "(1 round)")
            ]
            problems(parts, rounds)
            report.note(f"{c.label}, {taps} tap{'s' if taps > 1 else ''}: " + "; ".join(parts))
    for c in contenders:
        report.note(f"{c.label}: while enqueuing in these rounds, {c.gc_pauses.describe()}")
    report.note(
        "deliv. = events x taps. The producer, the owner's consumer, B's listener, its tap "
        "pumps and the tap consumers all share this process's event loop (one CPU): with 100 "
        "taps the rate is where they together saturate it, so A's enqueue loop is slowed by "
        "B's work too. One of the 100-tap RedisQueueManager rounds also ran the connection "
        "probe below"
    )


def problems(parts: list[str], rounds: Sequence[Round]) -> None:
    """Append what went wrong in these rounds (lost, out of order, incomplete)."""
    lost = sum(r.lost for r in rounds)
    disorder = sum(r.receipts.disorder for r in rounds)
    incomplete = sum(not r.complete for r in rounds)
    if lost:
        parts.append(f"WARNING: {lost:,} deliveries missing")
    if disorder:
        parts.append(f"WARNING: {disorder:,} deliveries out of order or repeated")
    if incomplete:
        parts.append(f"WARNING: {incomplete} rounds not complete after {DRAIN_TIMEOUT:g} s")


def connection_report(report: Report, probe: ConnectionProbe, taps: int) -> None:
    with report.group(
        f"replica B's Redis connections during a {taps}-tap round (CLIENT LIST, name {probe.name})",
        "conns",
        higher_is_better=False,
    ) as group:
        for label, metric, value in probe.rows:
            group.add(label, value, metric=metric)
    for when, stats in probe.stats.items():
        report.note(f"{when}: listener.stats() {stats['listener']}; B's stats() {stats['manager']}")
    if probe.commands:
        shown = ", ".join(f"{name} {n:,}" for name, n in probe.commands.items())
        report.note(
            f"server commands during that round, from the taps' opening to the close (INFO "
            f"commandstats difference, server-wide): {shown}"
        )
    report.note(
        f"each replica's client has a BlockingConnectionPool({POOL}), as "
        "RedisBackend.from_url makes it (with redis-py's default pool, 100 concurrent tap() "
        "calls raise PoolExhaustedError). The taps are opened concurrently (as concurrent "
        "resubscribe requests would), so the 'taps open' row includes the pool's connections "
        "from that burst; the idle ones are then closed, so the 'sending' row is what live "
        "delivery to the taps holds"
    )


# -- figure 2: latency -----------------------------------------------------------------------
async def latency(report: Report, sizes: Sizes, contenders: Sequence[Contender], a: Redis) -> None:
    for c in contenders:  # untimed warm-up
        await paced(c, sizes.rate, 0.1)
    rounds: dict[str, list[Round]] = {c.label: [] for c in contenders}
    for turn in range(sizes.turns):
        shift = turn % len(contenders)
        for c in [*contenders[shift:], *contenders[:shift]]:
            rounds[c.label].append(await paced(c, sizes.rate, sizes.seconds))
    ping = (
        await measure_latencies(
            {PING: a.ping}, samples=sizes.ping_samples, budget=sizes.seconds / 2
        )
    )[PING]

    title = (
        f"per-event latency, enqueue_event on A to dequeue_event on B's tap (in-memory: the "
        f"local tap), 1 tap, {sizes.rate:,.0f} events/s paced"
    )
    pooled: dict[str, list[float]] = {}
    with report.group(title, "ms", higher_is_better=False) as group:
        for c in contenders:
            lat = sorted(
                x for r in rounds[c.label] for x in r.latencies(r.first_send + sizes.warmup)
            )
            pooled[c.label] = lat
            if not lat:
                report.note(f"WARNING: {c.label}: no event was delivered")
                continue
            anchor = c.label != REDIS
            enqueue = sorted(x for r in rounds[c.label] for x in r.enqueue_s)
            detail = {
                "samples": len(lat),
                "max_ms": _ms(lat[-1]),
                "enqueue_median_ms": _ms(statistics.median(enqueue)),
                "enqueue_p99_ms": _ms(percentile(enqueue, 99)),
                "gen2_pauses_ms": [_ms(p) for p in c.gc_pauses.pauses],
            }
            note = f"n={len(lat)}"
            for metric, q in (("median", 50), ("p99", 99)):
                value = _ms(percentile(lat, q))
                group.add(c.label, value, metric=metric, anchor=anchor, note=note, detail=detail)
        note = f"n={ping.samples}"
        group.add(PING, ping.median_ms, metric="median", anchor=True, note=note)
        group.add(PING, ping.p99_ms, metric="p99", anchor=True, note=note)

    for c in contenders:
        measured = rounds[c.label]
        enqueue = sorted(x for r in measured for x in r.enqueue_s)
        parts = [
            f"{sum(r.receipts.received for r in measured):,} of "
            f"{sum(r.events for r in measured):,} events delivered",
            f"A's enqueue_event took median {_ms(statistics.median(enqueue)):.3f} ms, p99 "
            f"{_ms(percentile(enqueue, 99)):.3f} ms",
            f"in all its rounds, {c.gc_pauses.describe()}",
        ]
        problems(parts, measured)
        report.note(f"{c.label}: " + "; ".join(parts))


# -- the benchmark ---------------------------------------------------------------------------
async def run(ctx: RunContext, report: Report) -> None:
    sizes = QUICK if ctx.quick else FULL
    report.facts["sizes"] = dict(sizes.__dict__)
    prefix = ctx.namespace("queue_manager")
    name_b = f"a2a-bench-{ctx.run_id[:12]}-qm-B"
    client_a = replica_client(ctx, f"a2a-bench-{ctx.run_id[:12]}-qm-A", blocking_pool=POOL)
    client_b = replica_client(ctx, name_b, blocking_pool=POOL)
    sample = make_events("t" * 36, 1)[0]
    report.note(
        "A and B are two clients (two replicas) in this process, each with its own "
        "RedisQueueManager; A owns the queue (create_or_tap), B taps it (tap). The "
        "in-memory anchor is one InMemoryQueueManager, its taps local children. Each event is "
        f"a TaskStatusUpdateEvent of {sample.ByteSize()} bytes (serialised) with its sequence "
        "number in metadata; every consumer calls dequeue_event then task_done. Ratios are "
        "this value / the anchor's."
    )
    async with AsyncExitStack() as stack:
        stack.push_async_callback(client_a.aclose)
        stack.push_async_callback(client_b.aclose)
        listener = StreamListener(client_b, Keys(prefix))
        stack.push_async_callback(listener.aclose)
        a = RedisQueueManager(client_a, prefix=prefix)
        stack.push_async_callback(a.aclose)
        b = RedisQueueManager(client_b, prefix=prefix, listener=listener)
        stack.push_async_callback(b.aclose)
        memory = InMemoryQueueManager()
        contenders = [Contender(REDIS, a, b), Contender(MEMORY, memory, memory)]
        probe = ConnectionProbe(ctx, name_b, client_b, b, listener)

        await throughput(report, sizes, contenders, probe)
        connection_report(report, probe, max(sizes.taps))
        for c in contenders:
            c.gc_pauses = GcPauses()
        await latency(report, sizes, contenders, client_a)
        report.facts["after"] = {
            "A": a.stats(),
            "B": b.stats(),
            "listener": listener.stats(),
        }
        report.facts["connection_probe"] = {
            "rows": probe.rows,
            "stats": probe.stats,
            "commands": probe.commands,
        }


BENCHMARK = Benchmark(
    "queue_manager",
    "RedisQueueManager remote taps (throughput, fan-out, latency) beside InMemoryQueueManager",
    run,
)
