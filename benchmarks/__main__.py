"""Run the a2a-redis benchmarks: ``python -m benchmarks [--quick] [--url URL] [--only NAME]``.

Server: ``--url``, else ``$A2A_BENCH_REDIS_URL``, else the machine's Redis at
redis://127.0.0.1:6379 if it answers PING, else a private embedded valkey-server.
PostgreSQL anchors run when ``$A2A_BENCH_POSTGRES_DSN`` is set to an SQLAlchemy async URL
(for example ``postgresql+asyncpg://postgres@127.0.0.1:5432/test``).

Every key of a run lives under ``bench:<uuid hex>`` and is deleted at the end with SCAN MATCH
and UNLINK; the server may be shared, so nothing else is touched. Figures are printed and
written to ``benchmarks/results/<benchmark>-<UTC timestamp>.json``, and drawn, beside their
anchors and the last runs' figures, in ``benchmarks/results/report.html`` (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from benchmarks.common import (
    POSTGRES_ENV,
    Report,
    RunContext,
    Server,
    choose_server,
    delete_run_keys,
    machine_info,
    package_versions,
    server_info,
)
from benchmarks.registry import BENCHMARKS
from benchmarks.report import write_report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(__doc__ or "").split("\n\n", 1)[1].split("\n\n", 1)[0],
    )
    parser.add_argument(
        "--url", help="Redis URL (default: $A2A_BENCH_REDIS_URL, the local Redis, or embedded)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="shrink counts and durations (about 15 s)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=[b.name for b in BENCHMARKS],
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(b.name for b in BENCHMARKS)}",
    )
    return parser.parse_args(argv)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _header(mode: str, stamp: str, server: Server, meta: dict[str, Any], prefix: str) -> str:
    m, s, v = meta["machine"], meta["server"], meta["packages"]
    aof = "AOF on" if s["aof_enabled"] else "AOF off"
    parser = "hiredis parser" if s["hiredis_parser"] else "pure-Python parser"
    pg = "set" if meta["postgres"] else f"not set (${POSTGRES_ENV})"
    return "\n".join(
        [
            f"a2a-redis benchmarks: {mode} run, {stamp}",
            f"machine : {m['cpus']} CPUs, {m['platform']}, "
            f"Python {m['python']} ({m['implementation']})",
            f"server  : {s['name']} {s['version']} ({s['mode']}, {aof}) at {server.url}"
            f" - {server.source}",
            f"client  : redis-py {v['redis']} ({parser}), a2a-sdk {v['a2a-sdk']}, "
            f"SQLAlchemy {v['SQLAlchemy']}, aiosqlite {v['aiosqlite']}, asyncpg {v['asyncpg']}",
            f"postgres: {pg}",
            f"keys    : under {prefix}:*, unlinked at the end",
        ]
    )


async def run(args: argparse.Namespace) -> int:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_id = uuid.uuid4().hex
    prefix = f"bench:{run_id}"
    selected = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    postgres_dsn = os.environ.get(POSTGRES_ENV) or None
    server = await choose_server(args.url)
    redis = Redis.from_url(server.url)
    bulk = Redis(
        connection_pool=BlockingConnectionPool.from_url(server.url, max_connections=64, timeout=60)
    )
    status = 0
    try:
        meta = {
            "run_id": run_id,
            "mode": "quick" if args.quick else "full",
            "utc": stamp,
            "machine": machine_info(),
            "server": {**await server_info(redis), "source": server.source},
            "packages": package_versions(),
            "postgres": bool(postgres_dsn),
        }
        print(_header(str(meta["mode"]), stamp, server, meta, prefix), flush=True)
        with tempfile.TemporaryDirectory(prefix="a2a-redis-bench-") as tmp:
            ctx = RunContext(redis, bulk, prefix, args.quick, Path(tmp), postgres_dsn, run_id)
            for bench in selected:
                print(f"\n== {bench.name}: {bench.description} ==", flush=True)
                report = Report(bench.name)
                start = time.perf_counter()
                await bench.run(ctx, report)
                took = time.perf_counter() - start
                report.facts["seconds"] = took
                path = report.write(meta, stamp)
                print(f"{bench.name}: {took:.0f} s; results written to {_shown(path)}", flush=True)
        print(f"\nplots of this run and its history: {_shown(write_report())}")
    finally:
        try:
            deleted = await delete_run_keys(redis, prefix)
            print(f"\ncleanup: unlinked {deleted:,} keys under {prefix}:*")
        except (RedisError, OSError) as e:
            print(f"\ncleanup FAILED, keys under {prefix}:* may remain: {e}", file=sys.stderr)
            status = 1
        finally:
            await redis.aclose()
            await bulk.aclose()
            server.close()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
