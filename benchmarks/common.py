"""What every benchmark shares: the server, the run context, timing, and the report.

Nothing here ever touches a key outside the run's own prefix (``bench:<uuid hex>``): the
server may be shared, so there is no FLUSHALL, FLUSHDB or KEYS, and the clean-up is a SCAN
MATCH over that prefix followed by UNLINK.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.utils import HIREDIS_AVAILABLE

from a2a_redis.log.keys import Keys
from a2a_redis.ops.embedded import EmbeddedServer

LOCAL_URL = "redis://127.0.0.1:6379"
URL_ENV = "A2A_BENCH_REDIS_URL"
POSTGRES_ENV = "A2A_BENCH_POSTGRES_DSN"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

_RUN_PREFIX_RE = re.compile(r"^bench:[0-9a-f]{32}$")

#: One unit of work to time: a coroutine function taking no arguments.
Step = Callable[[], Awaitable[object]]


# -- the server ----------------------------------------------------------------------------
@dataclass
class Server:
    """The Redis-compatible server the run uses, and how it was chosen."""

    url: str
    source: str
    embedded: EmbeddedServer | None = None

    def close(self) -> None:
        """Stop the embedded server, if this run started one."""
        if self.embedded is not None:
            self.embedded.close()
            self.embedded = None


async def answers_ping(url: str) -> bool:
    """Whether a server at ``url`` answers PING within half a second."""
    client = Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


async def choose_server(url: str | None) -> Server:
    """``--url``, else ``$A2A_BENCH_REDIS_URL``, else the machine's Redis, else embedded."""
    if url:
        return Server(url, "--url")
    env_url = os.environ.get(URL_ENV)
    if env_url:
        return Server(env_url, f"${URL_ENV}")
    if await answers_ping(LOCAL_URL):
        return Server(LOCAL_URL, "the machine's Redis (answered PING)")
    embedded = EmbeddedServer().start()
    return Server(
        embedded.url, f"embedded valkey-server (nothing answered at {LOCAL_URL})", embedded
    )


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (``examples/`` is a folder of scripts, not a package)."""
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"a2a_redis_example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine_info() -> dict[str, Any]:
    """CPU count, platform and Python of this machine."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
    }


def package_versions() -> dict[str, str]:
    """Versions of the packages whose speed the figures depend on."""
    out = {}
    for name in ("a2a-redis", "a2a-sdk", "redis", "hiredis", "SQLAlchemy", "aiosqlite", "asyncpg"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


async def server_info(redis: Redis) -> dict[str, Any]:
    """Name, version, mode and persistence of the server (from INFO)."""
    info = await redis.info("server")
    persistence = await redis.info("persistence")
    if "valkey_version" in info:
        name, version = str(info.get("server_name", "valkey")), str(info["valkey_version"])
    else:
        name, version = str(info.get("server_name", "redis")), str(info.get("redis_version"))
    return {
        "name": name,
        "version": version,
        "mode": str(info.get("server_mode") or info.get("redis_mode") or "?"),
        "aof_enabled": bool(persistence.get("aof_enabled", 0)),
        "hiredis_parser": HIREDIS_AVAILABLE,
    }


# -- the run -------------------------------------------------------------------------------
@dataclass
class RunContext:
    """What a benchmark gets: clients, its namespace, the run mode, a scratch directory.

    ``redis`` has redis-py's default pool, as an application would; every timed operation
    uses it. ``bulk_redis`` has a blocking pool of 64 connections, for seeding with hundreds
    of concurrent saves (the default pool refuses more than 100 connections at once).
    """

    redis: Redis
    bulk_redis: Redis
    prefix: str
    quick: bool
    tmp_dir: Path
    postgres_dsn: str | None
    run_id: str

    def namespace(self, name: str) -> str:
        """A key prefix below the run's prefix, so the final clean-up covers it."""
        return f"{self.prefix}:{name}"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark module: a name (used in the results file name) and its coroutine."""

    name: str
    description: str
    run: Callable[[RunContext, Report], Awaitable[None]]


async def delete_run_keys(redis: Redis, prefix: str) -> int:
    """UNLINK every key under the run's prefix (SCAN MATCH, batches of 500). Returns the count."""
    if not _RUN_PREFIX_RE.match(prefix):  # never let a broad pattern through
        raise RuntimeError(f"refusing to clean up a prefix that is not a run's: {prefix!r}")
    pattern = Keys(prefix).scan_pattern()
    deleted = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += await redis.unlink(*batch)
            batch.clear()
    if batch:
        deleted += await redis.unlink(*batch)
    return deleted


# -- timing --------------------------------------------------------------------------------
# Contenders are measured in turns (round 1 of each, then round 2 of each, ...), each turn
# after a full garbage collection, so that a burst of load from elsewhere on the machine
# lands on all of them rather than on one, and the ratios stay meaningful.


def _turns(labels: Sequence[str], turn: int) -> list[str]:
    """The labels in the order of this turn: rotated, so no label always goes first."""
    shift = turn % len(labels) if labels else 0
    return [*labels[shift:], *labels[:shift]]


@dataclass
class RateResult:
    """Operations per second: the median over rounds, each round timed separately."""

    rate: float
    rounds: list[float]
    ops: int
    seconds: float

    def detail(self) -> dict[str, Any]:
        """The raw numbers behind the figure, for the JSON file."""
        return {"rounds_per_s": self.rounds, "ops": self.ops, "seconds": self.seconds}


async def _run_until(step: Step, deadline: float) -> int:
    count = 0
    while time.perf_counter() < deadline:
        await step()
        count += 1
    return count


async def _round(workers: Sequence[Step], seconds: float) -> tuple[int, float]:
    start = time.perf_counter()
    counts = await asyncio.gather(*(_run_until(w, start + seconds) for w in workers))
    return sum(counts), time.perf_counter() - start


async def measure_rates(
    workloads: Mapping[str, Sequence[Step]], *, seconds: float, rounds: int, warmup: float
) -> dict[str, RateResult]:
    """Steps per second of each workload: its workers loop on their step, concurrently.

    A round's rate is all steps completed over the wall time until the last worker stops;
    the result is the median round. Each workload first runs ``warmup`` seconds, not counted.
    """
    labels = list(workloads)
    for label in labels:
        await _round(workloads[label], warmup)
    done: dict[str, list[tuple[int, float]]] = {label: [] for label in labels}
    for turn in range(rounds):
        for label in _turns(labels, turn):
            gc.collect()
            done[label].append(await _round(workloads[label], seconds))
    results = {}
    for label, measured in done.items():
        rates = [ops / elapsed for ops, elapsed in measured]
        ops, elapsed = sum(o for o, _ in measured), sum(e for _, e in measured)
        results[label] = RateResult(statistics.median(rates), rates, ops, elapsed)
    return results


@dataclass
class LatencyResult:
    """Latency of one operation run back to back, in milliseconds."""

    median_ms: float
    p99_ms: float
    samples: int

    def detail(self) -> dict[str, Any]:
        """The raw numbers behind the figure, for the JSON file."""
        return {"samples": self.samples}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of already sorted values."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def _sample(op: Step, times: list[float], samples: int, budget: float, least: int) -> None:
    stop = time.perf_counter() + budget
    taken = 0
    while taken < samples and (taken < least or time.perf_counter() < stop):
        start = time.perf_counter()
        await op()
        times.append(time.perf_counter() - start)
        taken += 1


async def measure_latencies(
    ops: Mapping[str, Step],
    *,
    samples: int,
    budget: float,
    turns: int = 3,
    warmup: int = 3,
    min_samples: int = 6,
) -> dict[str, LatencyResult]:
    """Latency of each operation, run back to back, in ``turns`` interleaved turns.

    Each operation gets up to ``samples`` calls, fewer once ``budget`` seconds are spent
    (but at least ``min_samples``). With fewer than 100 samples, p99 is the maximum.
    """
    labels = list(ops)
    for label in labels:
        for _ in range(warmup):
            await ops[label]()
    times: dict[str, list[float]] = {label: [] for label in labels}
    per_turn = max(1, math.ceil(samples / turns))
    least = max(1, math.ceil(min_samples / turns))
    for turn in range(turns):
        for label in _turns(labels, turn):
            gc.collect()
            await _sample(ops[label], times[label], per_turn, budget / turns, least)
    results = {}
    for label, measured in times.items():
        measured.sort()
        results[label] = LatencyResult(
            statistics.median(measured) * 1000, percentile(measured, 99) * 1000, len(measured)
        )
    return results


# -- the report ----------------------------------------------------------------------------
def fmt_value(value: float) -> str:
    """A figure with as many digits as are meaningful."""
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_ratio(ratio: float) -> str:
    """A ratio with two significant digits, never in exponent notation."""
    if ratio >= 100:
        return f"{ratio:,.0f}x"
    if ratio >= 10:
        return f"{ratio:.0f}x"
    if ratio >= 1:
        return f"{ratio:.1f}x"
    digits = max(2, 1 - math.floor(math.log10(ratio))) if ratio > 0 else 2
    digits = min(digits, 6)
    return f"{ratio:.{digits}f}x"


@dataclass
class Row:
    """One measured value: a store (``label``), a ``metric`` (median, p99, ...), a value."""

    label: str
    value: float
    metric: str = ""
    anchor: bool = False
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Group:
    """Figures measured under the same conditions: the subject's rows and its anchors' rows.

    A subject row's ratios are its value divided by each anchor row's value with the same
    metric.
    """

    title: str
    unit: str
    higher_is_better: bool
    rows: list[Row] = field(default_factory=list)

    def add(
        self,
        label: str,
        value: float,
        *,
        metric: str = "",
        anchor: bool = False,
        note: str = "",
        detail: dict[str, Any] | None = None,
    ) -> Row:
        """Record one value."""
        row = Row(label, value, metric, anchor, note, detail or {})
        self.rows.append(row)
        return row

    def ratios(self, row: Row) -> dict[str, float]:
        """``row.value / anchor.value`` for every anchor with the same metric."""
        if row.anchor:
            return {}
        return {
            a.label: row.value / a.value
            for a in self.rows
            if a.anchor and a.metric == row.metric and a.value > 0
        }

    def render(self) -> str:
        """The group as a small table."""
        better = "higher" if self.higher_is_better else "lower"
        lines = [f"{self.title}   [{self.unit}, {better} is better]"]
        for row in self.rows:
            ratios = ", ".join(f"{fmt_ratio(r)} {label}" for label, r in self.ratios(row).items())
            note = f"({row.note})" if row.note else ""
            lines.append(
                f"  {row.label:<22} {row.metric:<7} {fmt_value(row.value):>10} {self.unit:<8}"
                f" {note:<9} {ratios}".rstrip()
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The group for the results file."""
        return {
            "title": self.title,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "rows": [
                {
                    "label": r.label,
                    "metric": r.metric,
                    "value": r.value,
                    "anchor": r.anchor,
                    "ratios": self.ratios(r),
                    "note": r.note,
                    "detail": r.detail,
                }
                for r in self.rows
            ],
        }


@dataclass
class Report:
    """Everything one benchmark measured; groups print as soon as they are complete."""

    benchmark: str
    groups: list[Group] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    out: Callable[[str], None] = print

    @contextmanager
    def group(self, title: str, unit: str, *, higher_is_better: bool) -> Iterator[Group]:
        """Collect one group's rows, then print it."""
        group = Group(title, unit, higher_is_better)
        yield group
        self.groups.append(group)
        self.out(group.render())

    def note(self, text: str) -> None:
        """Print a remark and keep it in the results file."""
        self.notes.append(text)
        self.out(f"  - {text}")

    def write(self, meta: dict[str, Any], stamp: str) -> Path:
        """Write ``results/<benchmark>-<stamp>.json``; return its path."""
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{self.benchmark}-{stamp}.json"
        body = {
            "benchmark": self.benchmark,
            **meta,
            "facts": self.facts,
            "notes": self.notes,
            "groups": [g.to_json() for g in self.groups],
        }
        path.write_text(json.dumps(body, indent=2, default=_json_default) + "\n")
        return path


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
