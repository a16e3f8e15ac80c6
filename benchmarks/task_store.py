"""The task store: ``VersionedRedisTaskStore`` beside its anchors, in one run.

Figures:

1. Versioned save rate: a chain of compare-and-swap status updates (WORKING and
   INPUT_REQUIRED in turn, a fresh status timestamp each time, each save carrying its
   ``TaskStatusUpdateEvent``), from 1 coroutine and from 32 coroutines with a task each.
2. Get rate from 1 coroutine, over the tasks the chains wrote.
3. ListTasks latency (median, p99): the first page of 50, a page filtered by context id,
   and the 3rd page reached through ``next_page_token``, with N tasks for one owner.

Anchors: the SDK's ``InMemoryTaskStore`` (plain save, no version, no event), its
``VersionedDatabaseTaskStore`` on SQLite (a file in a temporary directory, SDK defaults)
and on PostgreSQL when ``$A2A_BENCH_POSTGRES_DSN`` is set, and the redis-py floor on the
same client (one HSET / HGET of the task bytes per operation).
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import cast

from a2a.server.cluster import TaskVersion, VersionedDatabaseTaskStore, VersionedTaskStore
from a2a.server.context import ServerCallContext
from a2a.server.tasks import InMemoryTaskStore
from a2a.server.tasks.database_task_store import DatabaseTaskStore
from a2a.server.tasks.task_store import TaskStore
from a2a.types.a2a_pb2 import (
    ListTasksRequest,
    ListTasksResponse,
    Message,
    Part,
    Role,
    Task,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from a2a_redis.stores.task_store import VersionedRedisTaskStore
from benchmarks.common import (
    Benchmark,
    Report,
    RunContext,
    Step,
    fmt_value,
    measure_latencies,
    measure_rates,
)

CTX = ServerCallContext()  # the anonymous user: every task has owner ""
CONCURRENCY = 32
CONTEXTS = 10  # ListTasks tasks are spread over this many context ids
FILTER_CONTEXT = "ctx-3"
PAGE = 50
SQL_SEED_BATCH = 1000
_BASE_NS = 1_700_000_000 * 10**9
_TEXT = "Summarise the attached quarterly report and list the three largest cost items. " * 3

REDIS = "redis store"
RAW = "raw redis-py"
MEMORY = "in-memory"
SQLITE = "SQLite"
POSTGRES = "PostgreSQL"


@dataclass(frozen=True)
class Sizes:
    """How long and how big: the full run (about 2 minutes) or ``--quick`` (about 15 s)."""

    seconds: float  # per timed round of a rate
    rounds: int  # rounds per rate; the figure is their median
    warmup: float  # seconds of untimed warm-up before a rate
    list_ns: tuple[int, ...]  # ListTasks sizes, seeded cumulatively
    sql_list_max: int  # the largest N seeded into the SQL anchors
    latency_samples: int  # at most this many ListTasks calls per figure ...
    latency_budget: float  # ... or fewer once this many seconds are spent
    seed_batch: int = 200  # concurrent saves per asyncio.gather when seeding


FULL = Sizes(1.0, 3, 0.5, (1_000, 10_000, 100_000), 10_000, 300, 1.2)
QUICK = Sizes(0.15, 2, 0.1, (1_000,), 1_000, 60, 0.3)


def new_task(i: int) -> Task:
    """A WORKING task with one user message, in context ``ctx-<i % CONTEXTS>``.

    ``i`` orders the status timestamps (1 ms apart), so every store sorts the tasks alike.
    """
    task_id = str(uuid.uuid4())
    ctx_id = f"ctx-{i % CONTEXTS}"
    task = Task(
        id=task_id,
        context_id=ctx_id,
        status=TaskStatus(state=TaskState.TASK_STATE_WORKING),
    )
    task.status.timestamp.FromNanoseconds(_BASE_NS + i * 1_000_000)
    task.history.append(
        Message(
            message_id=str(uuid.uuid4()),
            context_id=ctx_id,
            task_id=task_id,
            role=Role.ROLE_USER,
            parts=[Part(text=_TEXT)],
        )
    )
    return task


# -- save and get targets --------------------------------------------------------------------
SaveFn = Callable[
    [Task, TaskStatusUpdateEvent | None, Task | None, TaskVersion], Awaitable[TaskVersion]
]


@dataclass
class Target:
    """One store under the save and get figures, behind a common calling convention."""

    label: str
    save: SaveFn
    get: Callable[[str], Awaitable[object]]
    version: Callable[[str], Awaitable[TaskVersion]]


def versioned_target(label: str, store: VersionedTaskStore) -> Target:
    async def save(
        task: Task, event: TaskStatusUpdateEvent | None, prev: Task | None, version: TaskVersion
    ) -> TaskVersion:
        return await store.save(task, event=event, prev=prev, prev_version=version, context=CTX)

    async def get(task_id: str) -> object:
        return await store.get(task_id, CTX)

    async def version(task_id: str) -> TaskVersion:
        stored = await store.get(task_id, CTX)
        return TaskVersion.MISSING if stored is None else stored.version

    return Target(label, save, get, version)


def plain_target(label: str, store: TaskStore) -> Target:
    async def save(
        task: Task, event: TaskStatusUpdateEvent | None, prev: Task | None, version: TaskVersion
    ) -> TaskVersion:
        await store.save(task, CTX)
        return version

    async def get(task_id: str) -> object:
        return await store.get(task_id, CTX)

    async def version(task_id: str) -> TaskVersion:
        return TaskVersion.MISSING

    return Target(label, save, get, version)


def raw_target(label: str, redis: Redis, prefix: str) -> Target:
    """The floor: one HSET (save) or HGET (get) of the task bytes, on the store's client."""

    async def save(
        task: Task, event: TaskStatusUpdateEvent | None, prev: Task | None, version: TaskVersion
    ) -> TaskVersion:
        await redis.hset(f"{prefix}:{task.id}", mapping={b"d": task.SerializeToString()})
        return version

    async def get(task_id: str) -> object:
        return await redis.hget(f"{prefix}:{task_id}", b"d")

    async def version(task_id: str) -> TaskVersion:
        return TaskVersion.MISSING

    return Target(label, save, get, version)


class Chain:
    """One task moved through status updates, each saved against the version it came from."""

    def __init__(self, target: Target, task: Task) -> None:
        self.target = target
        self.task = task
        self.version = TaskVersion.MISSING
        self.steps = 0
        self.errors = 0
        self.last_error = ""

    async def create(self) -> Chain:
        self.version = await self.target.save(self.task, None, None, TaskVersion.MISSING)
        return self

    async def step(self) -> None:
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
        try:
            self.version = await self.target.save(task, event, self.task, self.version)
        except Exception as e:  # counted and shown; the chain re-reads and goes on
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"[:200]
            self.version = await self.target.version(task.id)
            return
        self.task = task


async def start_chains(target: Target, count: int, first: int) -> list[Chain]:
    tasks = [new_task(first + i) for i in range(count)]
    return list(await asyncio.gather(*(Chain(target, t).create() for t in tasks)))


def _error_note(report: Report, label: str, chains: Sequence[Chain]) -> str:
    errors = sum(c.errors for c in chains)
    if not errors:
        return ""
    last = next(c.last_error for c in chains if c.errors)
    report.note(f"{label}: {errors} saves failed (last: {last})")
    return f"errors={errors}"


# -- SQL anchors -----------------------------------------------------------------------------
class SqlStores:
    """The SQL anchors of this run: engines, stores, and clean-up (PostgreSQL tables dropped)."""

    def __init__(self, ctx: RunContext, stack: AsyncExitStack) -> None:
        self.ctx = ctx
        self.stack = stack
        self.tag = ctx.run_id[:12]

    async def sqlite(self, name: str) -> VersionedDatabaseTaskStore:
        engine = create_async_engine(f"sqlite+aiosqlite:///{self.ctx.tmp_dir / name}.db")
        self.stack.push_async_callback(engine.dispose)
        store = VersionedDatabaseTaskStore(engine)
        await store.initialize()
        return store

    async def postgres(self, name: str) -> VersionedDatabaseTaskStore | None:
        if not self.ctx.postgres_dsn:
            return None
        engine = create_async_engine(self.ctx.postgres_dsn)
        self.stack.push_async_callback(engine.dispose)
        base = f"bench_{self.tag}_{name}"
        tables = [f"{base}_events", f"{base}_versions", f"{base}_tasks"]
        self.stack.push_async_callback(_drop_tables, engine, tables)
        store = VersionedDatabaseTaskStore(
            engine,
            table_name=f"{base}_tasks",
            event_table_name=f"{base}_events",
            version_table_name=f"{base}_versions",
        )
        await store.initialize()
        return store


async def _drop_tables(engine: AsyncEngine, tables: Sequence[str]) -> None:
    async with engine.begin() as conn:
        for table in tables:
            await conn.execute(text(f'DROP TABLE IF EXISTS "{table}"'))


# -- figures 1 and 2: save and get -----------------------------------------------------------
def cycling_get(target: Target, task_ids: Sequence[str]) -> Step:
    """A step getting the given tasks in turn."""
    ids = itertools.cycle(task_ids)

    async def step() -> None:
        await target.get(next(ids))

    return step


async def save_and_get(ctx: RunContext, report: Report, sizes: Sizes, sql: SqlStores) -> None:
    targets = [
        versioned_target(REDIS, VersionedRedisTaskStore(ctx.redis, prefix=ctx.namespace("store"))),
        raw_target(RAW, ctx.redis, ctx.namespace("raw")),
        plain_target(MEMORY, InMemoryTaskStore()),
        versioned_target(SQLITE, await sql.sqlite("store")),
    ]
    pg = await sql.postgres("store")
    if pg is not None:
        targets.append(versioned_target(POSTGRES, pg))

    chains: dict[str, list[Chain]] = {t.label: [] for t in targets}
    for concurrency in (1, CONCURRENCY):
        title = (
            "versioned save, 1 coroutine (one task, a chain of CAS updates)"
            if concurrency == 1
            else f"versioned save, {concurrency} coroutines (a task each)"
        )
        fresh = {t.label: await start_chains(t, concurrency, len(chains[t.label])) for t in targets}
        results = await measure_rates(
            {label: [c.step for c in mine] for label, mine in fresh.items()},
            seconds=sizes.seconds,
            rounds=sizes.rounds,
            warmup=sizes.warmup,
        )
        with report.group(title, "saves/s", higher_is_better=True) as group:
            for label, result in results.items():
                chains[label] += fresh[label]
                note = _error_note(report, label, fresh[label])
                group.add(
                    label, result.rate, anchor=label != REDIS, note=note, detail=result.detail()
                )

    task_ids = {label: [c.task.id for c in mine] for label, mine in chains.items()}
    for target in targets:
        if await target.get(task_ids[target.label][0]) is None:
            report.note(f"WARNING: {target.label}: get returned None for a saved task")
    results = await measure_rates(
        {t.label: [cycling_get(t, task_ids[t.label])] for t in targets},
        seconds=sizes.seconds,
        rounds=sizes.rounds,
        warmup=sizes.warmup,
    )
    with report.group("get, 1 coroutine", "gets/s", higher_is_better=True) as group:
        for label, result in results.items():
            group.add(label, result.rate, anchor=label != REDIS, detail=result.detail())


# -- figure 2b: the same ratios from alternating short blocks ----------------------------------
async def _block(chains: Sequence[Chain], steps: int) -> float:
    """Saves per second of ``steps`` saves on each of ``chains`` at once."""
    start = time.perf_counter()

    async def run(chain: Chain) -> None:
        for _ in range(steps):
            await chain.step()

    await asyncio.gather(*(run(c) for c in chains))
    return len(chains) * steps / (time.perf_counter() - start)


async def _gets(target: Target, task_id: str, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        await target.get(task_id)
    return count / (time.perf_counter() - start)


async def paired(ctx: RunContext, report: Report, sizes: Sizes) -> None:
    """The store / raw ratios, each the median over short blocks run alternately.

    On a shared, noisy machine a ratio of two rates taken seconds apart drifts with the
    load; a pair of blocks a few milliseconds apart sees the same load.
    """
    store = versioned_target(
        REDIS, VersionedRedisTaskStore(ctx.redis, prefix=ctx.namespace("pair"))
    )
    raw = raw_target(RAW, ctx.redis, ctx.namespace("pair-raw"))
    one = [await start_chains(t, 1, 0) for t in (store, raw)]
    many = [await start_chains(t, CONCURRENCY, 1) for t in (store, raw)]
    ids = [one[0][0].task.id, one[1][0].task.id]
    shapes = {
        "save, 1 coroutine": lambda i: _block(one[i], 100),
        f"save, {CONCURRENCY} coroutines": lambda i: _block(many[i], 10),
        "get, 1 coroutine": lambda i: _gets((store, raw)[i], ids[i], 100),
    }
    pairs = 8 if ctx.quick else 30
    ratios: dict[str, list[float]] = {name: [] for name in shapes}
    for turn in range(pairs):
        for name, block in shapes.items():
            rates = [0.0, 0.0]
            for i in (0, 1) if turn % 2 == 0 else (1, 0):
                rates[i] = await block(i)
            ratios[name].append(rates[0] / rates[1])
    title = f"redis store / raw redis-py, median of {pairs} pairs of alternating blocks"
    with report.group(title, "x raw", higher_is_better=True) as group:
        for name, found in ratios.items():
            q = statistics.quantiles(found, n=4)
            group.add(name, statistics.median(found), note=f"IQR {q[0]:.2f}-{q[2]:.2f}")
    _error_note(report, REDIS, one[0] + many[0])


# -- figure 3: ListTasks ---------------------------------------------------------------------
@dataclass(frozen=True)
class Query:
    """One ListTasks request shape: a filter, and how many pages to walk before timing."""

    name: str
    context_id: str = ""
    skip_pages: int = 0

    def title(self, n: int) -> str:
        if self.context_id:
            return (
                f"ListTasks page of {PAGE} filtered by context_id "
                f"({n // CONTEXTS:,} of N={n:,} match)"
            )
        if self.skip_pages:
            return f"ListTasks page {self.skip_pages + 1} of {PAGE} via next_page_token, N={n:,}"
        return f"ListTasks first page of {PAGE}, no filter, N={n:,}"

    def expected_total(self, n: int) -> int:
        return n // CONTEXTS if self.context_id else n


QUERIES = (
    Query("first page"),
    Query("filtered page", context_id=FILTER_CONTEXT),
    Query("3rd page", skip_pages=2),
)

ListFn = Callable[[ListTasksRequest], Awaitable[ListTasksResponse]]


@dataclass
class Lister:
    """One store under the ListTasks figure: how to list, how to seed, and up to which N."""

    label: str
    list: ListFn
    seed: Callable[[Sequence[Task]], Awaitable[None]]
    seed_how: str
    max_n: int | None = None


async def _gather_in_batches(
    save: Callable[[Task], Awaitable[object]], tasks: Sequence[Task], batch: int
) -> None:
    for start in range(0, len(tasks), batch):
        await asyncio.gather(*(save(t) for t in tasks[start : start + batch]))


def redis_lister(ctx: RunContext, sizes: Sizes) -> Lister:
    prefix = ctx.namespace("list")
    store = VersionedRedisTaskStore(ctx.redis, prefix=prefix)
    seeder = VersionedRedisTaskStore(ctx.bulk_redis, prefix=prefix)

    async def save(task: Task) -> object:
        return await seeder.save(
            task, event=None, prev=None, prev_version=TaskVersion.MISSING, context=CTX
        )

    async def seed(tasks: Sequence[Task]) -> None:
        await _gather_in_batches(save, tasks, sizes.seed_batch)

    async def list_(request: ListTasksRequest) -> ListTasksResponse:
        return await store.list(request, CTX)

    return Lister(REDIS, list_, seed, f"versioned save, {sizes.seed_batch} at a time")


def memory_lister() -> Lister:
    store = InMemoryTaskStore()

    async def seed(tasks: Sequence[Task]) -> None:
        for task in tasks:
            await store.save(task, CTX)

    async def list_(request: ListTasksRequest) -> ListTasksResponse:
        return await store.list(request, CTX)

    return Lister(MEMORY, list_, seed, "save, one by one")


def sql_lister(label: str, store: VersionedDatabaseTaskStore, max_n: int) -> Lister:
    """A SQL anchor, seeded with bulk INSERTs of the SDK's own row mapping.

    Seeding through ``save()`` (one transaction per task) is what figure 1 measures; at a few
    hundred per second it would take most of the run's time for N=10,000. ListTasks reads only
    the tasks table, which the bulk path fills exactly as ``save()`` would.
    """
    db = cast("DatabaseTaskStore", store.as_task_store)
    owner = db.owner_resolver(CTX)

    async def seed(tasks: Sequence[Task]) -> None:
        for start in range(0, len(tasks), SQL_SEED_BATCH):
            async with db.async_session_maker.begin() as session:
                session.add_all(
                    [db._to_orm(t, owner) for t in tasks[start : start + SQL_SEED_BATCH]]
                )

    async def list_(request: ListTasksRequest) -> ListTasksResponse:
        return await store.list(request, CTX)

    how = f"bulk INSERT of the SDK's row mapping, {SQL_SEED_BATCH} rows per transaction"
    return Lister(label, list_, seed, how, max_n)


async def _request_for(lister: Lister, query: Query) -> ListTasksRequest:
    """The query's request, with the page token reached by walking ``skip_pages`` pages."""
    request = ListTasksRequest(page_size=PAGE, context_id=query.context_id)
    for _ in range(query.skip_pages):
        response = await lister.list(request)
        request = ListTasksRequest(
            page_size=PAGE, context_id=query.context_id, page_token=response.next_page_token
        )
    return request


def _list_step(lister: Lister, request: ListTasksRequest) -> Step:
    async def step() -> None:
        await lister.list(request)

    return step


async def measure_query(
    report: Report, sizes: Sizes, query: Query, n: int, listers: Sequence[Lister]
) -> None:
    pages: dict[str, tuple[list[str], int]] = {}
    steps: dict[str, Step] = {}
    for lister in listers:
        request = await _request_for(lister, query)
        response = await lister.list(request)
        pages[lister.label] = ([t.id for t in response.tasks], response.total_size)
        steps[lister.label] = _list_step(lister, request)
    results = await measure_latencies(
        steps, samples=sizes.latency_samples, budget=sizes.latency_budget
    )
    with report.group(query.title(n), "ms", higher_is_better=False) as group:
        for label, lat in results.items():
            anchor = label != REDIS
            note = f"n={lat.samples}"
            group.add(label, lat.median_ms, metric="median", anchor=anchor, note=note)
            group.add(label, lat.p99_ms, metric="p99", anchor=anchor, note=note)
    check_pages(report, query, n, pages)


def check_pages(
    report: Report, query: Query, n: int, pages: dict[str, tuple[list[str], int]]
) -> None:
    """Compare every store's page with the SDK's in-memory answer (a sanity check, not timed)."""
    expected_ids, _ = pages[MEMORY]
    for label, (ids, total) in pages.items():
        problems = []
        if len(ids) != PAGE:
            problems.append(f"{len(ids)} tasks instead of {PAGE}")
        if total != query.expected_total(n):
            problems.append(f"total_size {total} instead of {query.expected_total(n)}")
        if ids != expected_ids:
            problems.append("not the tasks the in-memory store returns")
        if problems:
            report.note(f"WARNING: {label}, {query.name}, N={n:,}: " + "; ".join(problems))


async def list_tasks(ctx: RunContext, report: Report, sizes: Sizes, sql: SqlStores) -> None:
    listers = [redis_lister(ctx, sizes), memory_lister()]
    listers.append(sql_lister(SQLITE, await sql.sqlite("list"), sizes.sql_list_max))
    pg = await sql.postgres("list")
    if pg is not None:
        listers.append(sql_lister(POSTGRES, pg, sizes.sql_list_max))

    seeded = 0
    report.facts["seed"] = []
    for n in sizes.list_ns:
        fresh = [new_task(i) for i in range(seeded, n)]
        active = [lister for lister in listers if lister.max_n is None or n <= lister.max_n]
        parts = []
        for lister in active:
            start = time.perf_counter()
            await lister.seed(fresh)
            took = time.perf_counter() - start
            parts.append(f"{lister.label} {took:.1f} s ({fmt_value(len(fresh) / took)}/s)")
            seed_fact = {"store": lister.label, "n": n, "added": len(fresh), "seconds": took}
            report.facts["seed"].append({**seed_fact, "how": lister.seed_how})
        report.note(f"seeded N={n:,} (+{len(fresh):,} tasks): " + ", ".join(parts))
        skipped = [lister.label for lister in listers if lister not in active]
        if skipped:
            report.note(
                f"{' and '.join(skipped)} skipped at N={n:,}: the SQL anchors are seeded "
                f"up to N={sizes.sql_list_max:,} only, to keep the run short"
            )
        seeded = n
        for query in QUERIES:
            await measure_query(report, sizes, query, n, active)


# -- the benchmark ---------------------------------------------------------------------------
async def run(ctx: RunContext, report: Report) -> None:
    sizes = QUICK if ctx.quick else FULL
    report.facts["sizes"] = {**sizes.__dict__, "concurrency": CONCURRENCY, "page": PAGE}
    payload = len(new_task(0).SerializeToString())
    report.note(
        f"a task is {payload} bytes serialised (one user message). A save changes the state "
        "(WORKING <-> INPUT_REQUIRED) and the status timestamp and carries its event. "
        "raw redis-py = one HSET/HGET of the task bytes; in-memory = plain save (no CAS, "
        "no event). Ratios are this value / the anchor's."
    )
    if not ctx.postgres_dsn:
        report.note("PostgreSQL anchors skipped: A2A_BENCH_POSTGRES_DSN is not set")
    report.note(
        "for ListTasks the SQL anchors are seeded with bulk INSERTs of the SDK's own row "
        f"mapping ({SQL_SEED_BATCH:,} rows per transaction), not save(): save() is figure 1, "
        "and seeding 10,000 tasks through it would take much of the run"
    )
    async with AsyncExitStack() as stack:
        sql = SqlStores(ctx, stack)
        await save_and_get(ctx, report, sizes, sql)
        await paired(ctx, report, sizes)
        await list_tasks(ctx, report, sizes, sql)


BENCHMARK = Benchmark(
    "task_store",
    "VersionedRedisTaskStore save / get / ListTasks beside in-memory, SQL and raw redis-py",
    run,
)
