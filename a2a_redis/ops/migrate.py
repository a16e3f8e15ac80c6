"""``a2a-redis migrate``: copy the a2a-sdk's SQL tasks into Redis.

Each task is written through the task store's record engine (``TaskRecords.write``), so
it enters its owner's ListTasks indexes exactly as a save would, at the version the SQL
store gave it (1 when the row has none), with the events ``DatabaseTaskEventStream``
retained appended to its stream in the same MULTI/EXEC. Push configs are written through
``RedisPushNotificationConfigStore`` (encrypted when a Redis encryption key is given)
before their task, and only when the task is absent or older in Redis.

Per task, against what Redis holds:

* absent: copied;
* an older version, same owner: updated to the SQL version (counted as copied; only the
  events newer than the Redis version are appended);
* the same version: skipped, so a second run copies nothing and an interrupted run
  resumes where it stopped;
* a newer version, another owner, or a different terminal state: a conflict, left alone;
* an unreadable SQL row (JSON, event or push config) or a refused write: a failure.

Memory is bounded: SQL rows are read ``batch`` at a time and at most ``concurrency``
writes are in flight.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event

from a2a_redis.connection.cluster import Client
from a2a_redis.connection.transaction import execute
from a2a_redis.errors import (
    A2ARedisError,
    InvalidIdError,
    TaskOwnedElsewhereError,
    TerminalStateError,
    redis_errors,
)
from a2a_redis.log.codec import F_OWNER, F_VERSION, RecordHead
from a2a_redis.options import Options
from a2a_redis.stores.push_config_store import RedisPushNotificationConfigStore
from a2a_redis.stores.records import TaskRecords

__all__ = ["Counts", "Progress", "migrate"]

_OWNER = "a2a_redis_migrate_owner"
#: Ids listed per kind in the final counts (the totals are always exact).
MAX_LISTED = 100


@dataclass
class Counts:
    """What a run did. ``conflicts`` and ``failures`` list (at most MAX_LISTED) task ids."""

    copied: int = 0
    skipped: int = 0
    push_configs: int = 0
    events: int = 0
    conflicts: int = 0
    failures: int = 0
    conflict_ids: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seen: int = 0

    def conflict(self, task_id: str) -> None:
        """Count a conflict."""
        self.conflicts += 1
        if len(self.conflict_ids) < MAX_LISTED:
            self.conflict_ids.append(task_id)

    def fail(self, task_id: str, why: str) -> None:
        """Count a failure, and why."""
        self.failures += 1
        if len(self.failed) < MAX_LISTED:
            self.failed.append((task_id, why))

    def as_dict(self) -> dict[str, Any]:
        """The counts as JSON-ready values."""
        return {
            "copied": self.copied,
            "skipped": self.skipped,
            "conflicts": self.conflicts,
            "failures": self.failures,
            "push_configs": self.push_configs,
            "events": self.events,
            "conflict_ids": self.conflict_ids,
            "failed": [{"id": i, "error": e} for i, e in self.failed],
        }


class Progress:
    """Progress: a ``rich`` bar on a terminal (the ``cli`` extra), else plain lines.

    A line every ``every`` tasks on ``out`` when it is not a terminal or rich is missing.
    """

    def __init__(self, total: int, *, out: TextIO | None = None, every: int = 10_000) -> None:
        self.out = out or sys.stderr
        self.total, self.every, self.done, self._next = total, every, 0, every
        self._start = time.monotonic()
        self._bar: Any = None
        if self.out.isatty():
            try:
                from rich.console import Console  # type: ignore[import-not-found,unused-ignore]
                from rich.progress import Progress as RichProgress  # type: ignore[import-not-found,unused-ignore]
            except ImportError:
                pass
            else:  # on ``out`` (stderr), never on stdout: that is for the counts (--json)
                console = Console(file=self.out)
                self._bar = RichProgress(console=console, transient=True)
                self._bar.start()
                self._task = self._bar.add_task("tasks", total=total or None)

    def advance(self, n: int) -> None:
        """Count ``n`` more tasks done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        while self.done >= self._next:
            rate = self.done / max(time.monotonic() - self._start, 1e-9)
            of = f"/{self.total:,}" if self.total else ""  # total 0: not known (import)
            print(f"{self._next:,}{of} tasks ({rate:,.0f}/s)", file=self.out, flush=True)
            self._next += self.every

    def close(self) -> None:
        """Stop the bar."""
        if self._bar is not None:
            self._bar.stop()


class _Skip(Exception):
    """Raised by the version decision: nothing to write (``conflict`` says why)."""

    def __init__(self, conflict: bool) -> None:
        super().__init__()
        self.conflict = conflict


class Migrator:
    """Copies :class:`~a2a_redis.ops.sql_source.SourceTask` batches into one prefix."""

    def __init__(
        self,
        client: Client,
        prefix: str,
        *,
        encryption_key: str | bytes | None = None,
        concurrency: int = 32,
        dry_run: bool = False,
    ) -> None:
        self.records = TaskRecords(client, Options(prefix=prefix))
        self.push = RedisPushNotificationConfigStore(
            client,
            prefix=prefix,
            encryption_key=encryption_key,
            owner_resolver=lambda ctx: str(ctx.state[_OWNER]),
        )
        self.dry_run = dry_run
        self._slots = asyncio.Semaphore(concurrency)
        self.counts = Counts()

    async def copy_batch(self, items: list[Any]) -> None:
        """Copy one batch (at most ``concurrency`` writes in flight).

        One pipelined read of every task's owner and version first: the tasks Redis holds
        at the same version (a repeated or resumed run) are skipped without a transaction.
        """
        valid = []
        for item in items:
            try:
                valid.append((item, self.records.keys.task(item.task_id)))
            except InvalidIdError as e:  # an id Redis keys cannot hold: this task fails alone
                self.counts.seen += 1
                self.counts.fail(item.task_id, f"InvalidIdError: {e}"[:300])
        if not valid:
            return
        heads = await self._heads([key for _, key in valid])
        await asyncio.gather(
            *(self._guarded(item, head) for (item, _), head in zip(valid, heads, strict=True))
        )

    async def _heads(self, keys: list[str]) -> list[tuple[str, int] | None]:
        with redis_errors("read task versions", keys[0]):
            async with self.records.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, [F_OWNER, F_VERSION])
                rows = await execute(pipe)
        return [
            None if owner is None else (owner.decode("utf-8", "replace"), int(version or 0))
            for owner, version in rows
        ]

    async def _guarded(self, item: Any, head: tuple[str, int] | None) -> None:
        async with self._slots:
            self.counts.seen += 1
            if item.error or item.task is None:
                self.counts.fail(item.task_id, item.error or "no task")
                return
            try:
                if head is not None:  # decided here; the write decides again under WATCH
                    if head[0] != item.owner:
                        raise _Skip(conflict=True)
                    self._choose(item, head[1])
                await self._copy(item)
            except _Skip as s:
                self._skipped(item.task_id, s)
            except A2ARedisError as e:
                self.counts.fail(item.task_id, f"{type(e).__name__}: {e}"[:300])

    @staticmethod
    def _choose(item: Any, stored: int | None) -> int:
        """The version to write over a stored one (None: absent), or raise ``_Skip``."""
        target = int(item.version or 1)
        if stored is None or stored < target:
            return target
        raise _Skip(conflict=stored > target)

    def _decide(self, item: Any, seen: list[int]) -> Callable[[RecordHead | None], int]:
        def decide(old: RecordHead | None) -> int:
            seen[:] = [0 if old is None else old.version]
            return self._choose(item, None if old is None else old.version)

        return decide

    async def _copy(self, item: Any) -> None:
        stored = [0]  # the version the write replaced (its events are not appended again)
        decide = self._decide(item, stored)
        history: list[tuple[int, Event]] = [
            (v, e) for v, e in item.events if v <= (item.version or 1)
        ]
        if self.dry_run:
            self.counts.copied += 1
            self.counts.push_configs += len(item.push_configs)
            self.counts.events += len(history)
            return
        if item.push_configs:
            for owner, config in item.push_configs:  # before the task: a resumed run redoes them
                await self.push.set_info(
                    item.task_id, config, ServerCallContext(state={_OWNER: owner})
                )
            self.counts.push_configs += len(item.push_configs)
        try:
            await self.records.write(item.task, item.owner, None, decide, history=history)
        except _Skip as s:
            self._skipped(item.task_id, s)
            return
        except (TaskOwnedElsewhereError, TerminalStateError):
            self.counts.conflict(item.task_id)
            return
        self.counts.copied += 1
        self.counts.events += sum(1 for v, _ in history if v > stored[0])

    def _skipped(self, task_id: str, skip: _Skip) -> None:
        if skip.conflict:
            self.counts.conflict(task_id)
        else:
            self.counts.skipped += 1


async def migrate(
    source: Any,
    client: Client,
    prefix: str,
    *,
    encryption_key: str | bytes | None = None,
    dry_run: bool = False,
    concurrency: int = 32,
    progress: Progress | None = None,
    after: str = "",
) -> Counts:
    """Copy every task of ``source`` (an opened ``SqlSource``) into ``prefix``; the counts."""
    migrator = Migrator(
        client, prefix, encryption_key=encryption_key, concurrency=concurrency, dry_run=dry_run
    )
    async for batch in source.batches(after):
        await migrator.copy_batch(batch)
        if progress is not None:
            progress.advance(len(batch))
    return migrator.counts


async def verify(source: Any, client: Client, prefix: str) -> Counts:
    """Compare every SQL task with Redis, proto for proto (and owner and version).

    ``copied`` counts matches; a task missing or different is a failure naming why.
    """
    records = TaskRecords(client, Options(prefix=prefix))
    counts = Counts()
    async for batch in source.batches():
        found = await asyncio.gather(*(records.read_any(item.task_id) for item in batch))
        for item, stored in zip(batch, found, strict=True):
            counts.seen += 1
            if item.error or item.task is None:
                counts.fail(item.task_id, f"unreadable in SQL: {item.error}")
            elif stored is None:
                counts.fail(item.task_id, "missing in Redis")
            elif stored[0] != item.owner:
                counts.fail(item.task_id, "another owner in Redis")
            elif stored[2] != (item.version or 1):
                counts.fail(item.task_id, f"version {stored[2]} in Redis, {item.version} in SQL")
            elif stored[1] != item.task:
                counts.fail(item.task_id, "task differs")
            else:
                counts.copied += 1
    return counts
