"""``a2a-redis migrate``: tasks per second from the SDK's SQL tables into Redis, and peak memory.

The SQL tables are the SDK's own (``VersionedDatabaseTaskStore``'s tasks, versions and
events), seeded in bulk through the SDK's row conversion (``_to_orm``): 100,000 tasks
(10,000 with ``--quick``), each at version 2 with one retained event. Figures, for SQLite,
for PostgreSQL (``A2A_BENCH_POSTGRES_DSN``) and for MySQL/MariaDB (``A2A_BENCH_MYSQL_DSN``,
e.g. ``mysql+aiomysql://root@127.0.0.1:3306/test``):

1. migration rate (a first run into an empty prefix), beside the anchor of reading the
   same rows alone (``SqlSource.batches``: the SQL side's floor);
2. a second run over the same tasks (every one skipped: what resuming costs);
3. peak Python memory of a migration (tracemalloc, a separate run into a fresh prefix):
   it stays at the size of a batch, not of the table;
4. (SQLite run only) ``export`` of that prefix (all owners: SCAN, ids sorted) with its peak
   memory, then ``purge`` of every task (all COMPLETED, older than 30 days), three owners.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import tracemalloc
import warnings
from collections.abc import Iterator
from typing import Any

from a2a.server.cluster.database_task_store import VersionedDatabaseTaskStore
from a2a.types.a2a_pb2 import Artifact, Part, Task, TaskState, TaskStatus, TaskStatusUpdateEvent
from a2a.utils.proto_utils import to_stream_response
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from a2a_redis.ops import admin, transfer
from a2a_redis.ops.migrate import migrate
from a2a_redis.ops.sql_source import SqlSource, Tables
from benchmarks.common import Benchmark, Report, RunContext

FULL, QUICK = 100_000, 10_000
SEED_CHUNK = 5_000
MYSQL_ENV = "A2A_BENCH_MYSQL_DSN"


@contextlib.contextmanager
def aiomysql_bytes() -> Iterator[None]:
    """Let aiomysql 0.3.2 send bytes parameters (the seeded event rows) with PyMySQL >= 1.2.3,
    where ``escape_bytes_prefixed`` became a placeholder string (aio-libs/aiomysql#1080):
    PyMySQL's ``escape_bytes`` for the time of the seed. Reading (migrate) needs nothing."""
    try:
        import aiomysql.connection as conn
        import pymysql.converters as conv
    except ImportError:
        yield
        return
    saved = conn.escape_bytes_prefixed
    if not callable(saved):
        conn.escape_bytes_prefixed = conv.escape_bytes
    try:
        yield
    finally:
        conn.escape_bytes_prefixed = saved


async def seed(engine: AsyncEngine, tables: Tables, n: int) -> None:
    """``n`` tasks (three owners, version 2, one event each) in the SDK's tables."""
    with warnings.catch_warnings():  # the SDK declares a model class per custom table name
        warnings.filterwarnings("ignore", "This declarative base already contains a class")
        store = VersionedDatabaseTaskStore(
            engine,
            table_name=tables.tasks,
            event_table_name=tables.events,
            version_table_name=tables.versions,
        )
    await store.initialize()
    db = store._db
    model, vmodel, emodel = db.task_model, store._version_model, store._event_model
    columns = [c.key for c in model.__table__.columns]  # type: ignore[attr-defined]
    for start in range(0, n, SEED_CHUNK):
        rows, versions, events = [], [], []
        for i in range(start, min(start + SEED_CHUNK, n)):
            owner = ("", "alice", "bob")[i % 3]
            status = TaskStatus(state=TaskState.TASK_STATE_COMPLETED)
            status.timestamp.FromNanoseconds(1_790_000_000_000_000_000 + i * 1_000)
            task = Task(id=f"t{i:08d}", context_id=f"c{i % 50}", status=status)
            task.artifacts.append(Artifact(artifact_id="a", parts=[Part(text="result " * 8)]))
            orm = db._to_orm(task, owner)
            row = {c: getattr(orm, "task_metadata" if c == "metadata" else c) for c in columns}
            rows.append(row)
            versions.append({"task_id": task.id, "owner": owner, "version": 2})
            event = TaskStatusUpdateEvent(
                task_id=task.id, context_id=task.context_id, status=status
            )
            data = to_stream_response(event).SerializeToString()
            events.append(
                {"task_id": task.id, "owner": owner, "task_version": 2, "event_data": data}
            )
        async with engine.begin() as conn:
            await conn.execute(insert(model.__table__), rows)  # type: ignore[attr-defined]
            await conn.execute(insert(vmodel.__table__), versions)  # type: ignore[attr-defined]
            await conn.execute(insert(emodel.__table__), events)  # type: ignore[attr-defined]


async def _read_all(source: SqlSource) -> int:
    count = 0
    async for batch in source.batches():
        count += len(batch)
    return count


async def _one(ctx: RunContext, report: Report, label: str, dsn: str, n: int) -> None:
    engine = create_async_engine(dsn)
    base = f"bench_mig_{ctx.run_id[:8]}_{label}"
    tables = Tables(f"{base}_tasks", f"{base}_versions", f"{base}_events", f"{base}_push")
    try:
        with aiomysql_bytes():
            await seed(engine, tables, n)
        source = SqlSource(dsn, tables)
        await source.open()
        try:
            started = time.perf_counter()
            read = await _read_all(source)
            read_s = time.perf_counter() - started
            prefix = ctx.namespace(f"migrate:{label}")
            started = time.perf_counter()
            first = await migrate(source, ctx.bulk_redis, prefix)
            first_s = time.perf_counter() - started
            started = time.perf_counter()
            second = await migrate(source, ctx.bulk_redis, prefix)
            second_s = time.perf_counter() - started
            tracemalloc.start()
            copy = ctx.namespace(f"migrate:{label}:mem")
            await migrate(source, ctx.bulk_redis, copy)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        finally:
            await source.aclose()
        assert read == n and first.copied == n and second.skipped == n, (first, second)
        with report.group(
            f"migrate from {label}, {n:,} tasks", "tasks/s", higher_is_better=True
        ) as g:
            g.add("read SQL only", read / read_s, anchor=True)
            g.add("migrate (copy)", n / first_s, detail={"seconds": first_s})
            g.add("second run (skip)", n / second_s, detail={"seconds": second_s})
        with report.group(
            f"migrate from {label}: peak Python memory", "MiB", higher_is_better=False
        ) as g:
            g.add(f"{n:,} tasks", peak / 2**20, detail={"bytes": peak})
        if label == "sqlite":
            await _export_and_purge(ctx, report, copy, n)
    finally:
        async with engine.begin() as conn:
            quote = engine.dialect.identifier_preparer.quote_identifier  # MySQL: backticks
            for table in (tables.tasks, tables.versions, tables.events):
                await conn.execute(text(f"DROP TABLE IF EXISTS {quote(table)}"))
        await engine.dispose()


class _Counter(io.TextIOBase):
    """A text sink that counts what it is given (the export's output, not kept)."""

    def __init__(self) -> None:
        self.chars = 0

    def write(self, text: str) -> int:
        self.chars += len(text)
        return len(text)


async def _export_and_purge(ctx: RunContext, report: Report, prefix: str, n: int) -> None:
    sink = _Counter()
    tracemalloc.start()
    started = time.perf_counter()
    exported = await transfer.export(ctx.bulk_redis, prefix, sink)
    export_s = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    started = time.perf_counter()
    purged = 0
    for owner in await admin.owners(ctx.bulk_redis, prefix):
        counts = await admin.purge(
            ctx.bulk_redis, prefix, owner, [TaskState.TASK_STATE_COMPLETED], 30 * 86_400
        )
        purged += sum(counts.values())
    purge_s = time.perf_counter() - started
    assert exported == n and purged == n, (exported, purged)
    with report.group(f"export and purge, {n:,} tasks", "tasks/s", higher_is_better=True) as g:
        g.add("export (tracemalloc on)", n / export_s, detail={"bytes": sink.chars})
        g.add("purge", n / purge_s, detail={"seconds": purge_s})
    with report.group("export: peak Python memory", "MiB", higher_is_better=False) as g:
        g.add(f"{n:,} tasks", peak / 2**20, detail={"bytes": peak})


async def run(ctx: RunContext, report: Report) -> None:
    """Migrate from SQLite, then from PostgreSQL and MySQL when their DSNs are set."""
    n = QUICK if ctx.quick else FULL
    targets: list[tuple[str, Any]] = [("sqlite", f"sqlite+aiosqlite:///{ctx.tmp_dir / 'mig.db'}")]
    if ctx.postgres_dsn:
        targets.append(("postgresql", ctx.postgres_dsn))
    else:
        report.note("PostgreSQL skipped: set A2A_BENCH_POSTGRES_DSN to a postgresql+asyncpg DSN")
    if os.environ.get(MYSQL_ENV):
        targets.append(("mysql", os.environ[MYSQL_ENV]))
    else:
        report.note(f"MySQL skipped: set {MYSQL_ENV} to a mysql+aiomysql DSN")
    for label, dsn in targets:
        await _one(ctx, report, label, dsn, n)
    report.note(
        "batches of 500 rows, 32 writes in flight; the Redis side writes each task through "
        "the store's optimistic transaction (2 round trips) with its event"
    )


BENCHMARK = Benchmark(
    "migrate", "a2a-redis migrate from SQLite / PostgreSQL / MySQL; peak memory", run
)
