"""End to end: HTTP, the SDK and the backend, driven by the official a2a client.

Contenders, in one run, each with uvicorn replicas started for it (``--delay 0``):

- **redis**: two replicas of ``examples/agent_server.py`` on the run's Redis;
- **in-memory** (anchor): one replica with the SDK's ``InMemoryTaskStore`` and queues
  (``benchmarks/e2e_server.py``), which can only serve its own subscribers;
- **SQLite**, **PostgreSQL** (anchors): two replicas each of the SDK's SQL cluster mode
  (``VersionedDatabaseTaskStore`` + ``DatabaseTaskEventStream``, 0.5 s poll). PostgreSQL
  when ``$A2A_BENCH_POSTGRES_DSN`` is set, else at ``postgresql+asyncpg://postgres@
  127.0.0.1:5432/test`` if it answers; the run's tables are dropped at the end.

For N = 1, 10 and 100 (``--quick``: 1 and 10) concurrent tasks, the client sends each a
streaming message (``silent=0.3 chunks=20``: WORKING, 0.3 s without a word, 20 artifact
chunks, COMPLETED) to the first replica, and as soon as it knows the task's id subscribes
to it on the other replica (the same one for in-memory). Figures:

- events/s: events the senders' streams received from the first chunk to the last event,
  over that time (the agents run flat out then, so this is the stack's throughput);
- time to first event: from the send to its stream's first event;
- delivery p50/p99: per chunk, its arrival on the subscriber's stream after its arrival on
  the sender's (chunks the subscriber received live, not in its first Task snapshot). It
  is negative where the subscriber's replica delivers before the sender's own stream does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from a2a.client import Client, ClientConfig, create_client
from a2a.types import Message, Part, Role, SendMessageRequest, SubscribeToTaskRequest
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks.common import (
    POSTGRES_ENV,
    Benchmark,
    Report,
    RunContext,
    load_example,
    percentile,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
PROMPT = "silent=0.3 chunks=20"
CHUNK = re.compile(r"chunk (\d+) from")
ROUND_TIMEOUT = 180.0


def servers(commands: list[list[str]]) -> contextlib.AbstractContextManager[list[str]]:
    """Start one replica per command (``{port}`` filled in); yield their URLs; stop them."""
    # One by one: the SDK's SQL stores create their tables at start-up, and two would race.
    demo = load_example("demo")
    return demo.serve(commands, start_timeout=60, cwd=ROOT, one_by_one=True)  # type: ignore[no-any-return]


@dataclass
class Round:
    """What the client saw of N concurrent tasks."""

    events: int = 0  # on the senders' streams, from the first chunk on
    first_chunk: float = float("inf")
    last_event: float = 0.0
    firsts: list[float] = field(default_factory=list)  # seconds, send to first event
    deliveries: list[float] = field(default_factory=list)  # seconds, sender -> subscriber
    subscriber_events: int = 0
    failures: list[str] = field(default_factory=list)

    def rate(self) -> float:
        span = self.last_event - self.first_chunk
        return self.events / span if span > 0 else 0.0


def _chunk(response: object) -> int | None:
    if not response.HasField("artifact_update"):  # type: ignore[attr-defined]
        return None
    parts = response.artifact_update.artifact.parts  # type: ignore[attr-defined]
    found = CHUNK.search(parts[0].text) if parts else None
    return int(found.group(1)) if found else None


async def one_task(sender: Client, subscriber: Client, out: Round) -> None:
    request = SendMessageRequest(
        message=Message(
            role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[Part(text=PROMPT)]
        )
    )
    sent_at: dict[int, float] = {}
    got_at: dict[int, float] = {}
    task_id: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def follow() -> None:
        tid = await task_id
        async for response in subscriber.subscribe(SubscribeToTaskRequest(id=tid)):
            out.subscriber_events += 1
            i = _chunk(response)
            if i is not None:
                got_at[i] = time.perf_counter()

    follower = asyncio.ensure_future(follow())
    start = time.perf_counter()
    first = True
    try:
        async for response in sender.send_message(request):
            now = time.perf_counter()
            if first:
                out.firsts.append(now - start)
                first = False
            if response.HasField("task") and not task_id.done():
                task_id.set_result(response.task.id)
            i = _chunk(response)
            if i is not None:
                sent_at[i] = now
                out.first_chunk = min(out.first_chunk, now)
            if sent_at:
                out.events += 1
                out.last_event = max(out.last_event, now)
        await asyncio.wait_for(follower, 30)
    except Exception as e:
        out.failures.append(f"{type(e).__name__}: {e}"[:200])
    finally:
        follower.cancel()
        with contextlib.suppress(BaseException):
            await follower
    out.deliveries += [got_at[i] - sent_at[i] for i in got_at if i in sent_at]


async def run_round(urls: list[str], n: int) -> Round:
    out = Round()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=200)
    async with (
        httpx.AsyncClient(timeout=120, limits=limits) as h1,
        httpx.AsyncClient(timeout=120, limits=limits) as h2,
    ):
        sender = await create_client(urls[0], ClientConfig(httpx_client=h1))
        subscriber = await create_client(urls[-1], ClientConfig(httpx_client=h2))
        try:
            await asyncio.wait_for(
                asyncio.gather(*(one_task(sender, subscriber, out) for _ in range(n))),
                ROUND_TIMEOUT,
            )
        finally:
            await sender.close()
            await subscriber.close()
    return out


async def postgres_database(ctx: RunContext) -> str | None:
    """A database of the run's own on the PostgreSQL server (its URL), or None if none answers."""
    dsn = ctx.postgres_dsn or os.environ.get(POSTGRES_ENV) or DEFAULT_PG
    engine = create_async_engine(dsn, isolation_level="AUTOCOMMIT")
    name = f"a2a_e2e_{ctx.run_id[:12]}"
    try:
        async with engine.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception:
        return None
    finally:
        await engine.dispose()
    return str(make_url(dsn).set(database=name).render_as_string(hide_password=False))


async def drop_database(ctx: RunContext, url: str) -> None:
    dsn = ctx.postgres_dsn or os.environ.get(POSTGRES_ENV) or DEFAULT_PG
    engine = create_async_engine(dsn, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            name = make_url(url).database
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await engine.dispose()


def contenders(ctx: RunContext, redis_url: str, pg: str | None) -> dict[str, list[list[str]]]:
    py = sys.executable
    example = [py, "examples/agent_server.py", "--port", "{port}", "--delay", "0"]
    redis = [*example, "--redis-url", redis_url, "--prefix", ctx.namespace("e2e")]
    anchor = [py, "-m", "benchmarks.e2e_server", "--port", "{port}", "--delay", "0"]
    sqlite = f"sqlite+aiosqlite:///{ctx.tmp_dir / 'e2e.db'}"
    sql = [*anchor, "--backend", "sql", "--db-url"]
    found = {
        "redis, 2 replicas": [[*redis, "--name", "A"], [*redis, "--name", "B"]],
        "in-memory, 1 process": [[*anchor, "--backend", "memory"]],
        "SQLite, 2 replicas": [[*sql, sqlite], [*sql, sqlite]],
    }
    if pg is not None:
        found["PostgreSQL, 2 replicas"] = [[*sql, pg], [*sql, pg]]
    return found


async def run(ctx: RunContext, report: Report) -> None:
    sizes = (1, 10) if ctx.quick else (1, 10, 100)
    pool = ctx.redis.connection_pool.connection_kwargs
    redis_url = (
        f"redis://{pool.get('host', '127.0.0.1')}:{pool.get('port', 6379)}/{pool.get('db', 0)}"
    )
    pg = await postgres_database(ctx)
    results: dict[str, dict[int, Round]] = {}
    try:
        for label, commands in contenders(ctx, redis_url, pg).items():
            with servers(commands) as urls:
                await run_round(urls, 2)  # warm-up: connections, tables, imports
                results[label] = {n: await run_round(urls, n) for n in sizes}
    finally:
        if pg is not None:
            await drop_database(ctx, pg)
    if pg is None:
        report.note("PostgreSQL: no server answered; set $A2A_BENCH_POSTGRES_DSN")
    anchor = "in-memory, 1 process"
    for n in sizes:
        with report.group(
            f"e2e, {n} concurrent task(s): events/s", "/s", higher_is_better=True
        ) as g:
            for label, rounds in results.items():
                r = rounds[n]
                g.add(label, r.rate(), anchor=label == anchor, note=f"n={r.events}")
        with report.group(
            f"e2e, {n} concurrent task(s): time to first event, and delivery to the other replica",
            "ms",
            higher_is_better=False,
        ) as g:
            for label, rounds in results.items():
                r = rounds[n]
                is_anchor = label == anchor
                if r.firsts:
                    g.add(
                        label, statistics.median(r.firsts) * 1000, metric="first", anchor=is_anchor
                    )
                d = sorted(r.deliveries)
                if d:
                    note = f"n={len(d)}"
                    g.add(
                        label, percentile(d, 50) * 1000, metric="p50", anchor=is_anchor, note=note
                    )
                    g.add(
                        label, percentile(d, 99) * 1000, metric="p99", anchor=is_anchor, note=note
                    )
        for label, rounds in results.items():
            r = rounds[n]
            if r.failures:
                report.note(f"N={n}, {label}: {len(r.failures)} tasks failed ({r.failures[0]})")
    report.note(
        "in-memory's subscriber is on the same process as the sender (it has no other); the "
        "others' subscribers are on the second replica. Every replica, the client and Redis "
        "share this machine's cores"
    )


BENCHMARK = Benchmark(
    "e2e", "HTTP end to end: 2 Redis replicas vs in-memory, SQLite, PostgreSQL", run
)
