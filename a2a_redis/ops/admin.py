"""Operator actions on one prefix: cancel, delete, purge, stats (the CLI's ``ops/cli_ops.py``).

* ``cancel``: as a CancelTask reaching a replica that does not run the task. When a replica
  holds the task's lease, the cancel is forwarded to it (``events.control``): it runs the
  agent's cancel and records CANCELED, as a local cancel does. Otherwise (no replica runs
  it, or the holder does not answer within ``cancel_timeout``) the versioned CAS write of
  CANCELED (``handlers.cancel.record_cancel``): a replica still running the agent sees the
  conflict at its next save or lease renewal, and stops the agent.
* ``delete``: the store's delete (record, stream, push configs, index entries, atomically).
* ``purge``: index-driven. The owner's per-state ListTasks index sorts members by status
  timestamp, so the tasks older than a cutoff are a prefix of it, read ``batch`` at a time
  (``ZRANGE ... BYLEX LIMIT``) and deleted through the store: no KEYS, no SCAN over tasks,
  and ListTasks totals stay exact. Tasks without a status timestamp are never purged.
* ``stats``: an owner's task counts by state, from the index sizes (``ZCARD``); with
  ``key_kinds``, the prefix's keys by kind (task, events: the streams, lease: the tasks
  running, push, index, replica) with their memory, from a SCAN capped at
  ``doctor.KEY_SCAN_CAP`` keys, as ``doctor`` counts them.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from typing import Any, cast

from a2a.server.cluster import ConcurrentTaskModificationError
from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import TaskState
from a2a.utils.errors import TaskNotFoundError

from a2a_redis.backend import RedisBackend
from a2a_redis.connection.cluster import Client
from a2a_redis.connection.transaction import execute
from a2a_redis.handlers.cancel import record_cancel
from a2a_redis.log.codec import (
    TERMINAL_STATES,
    member_task_id,
    member_timestamp_floor,
    version_int,
)
from a2a_redis.log.keys import Keys
from a2a_redis.ops import doctor
from a2a_redis.ops.migrate import Progress
from a2a_redis.options import Options
from a2a_redis.stores.records import TaskRecords
from a2a_redis.stores.task_store import VersionedRedisTaskStore

__all__ = ["cancel", "delete", "key_kinds", "owners", "purge", "stats"]

STATES = [v.number for v in TaskState.DESCRIPTOR.values if v.number]
_TIMESTAMPED = b"[\x01"  # the first member with a timestamp (those without sort first)


def _store(client: Client, prefix: str, owner: str) -> VersionedRedisTaskStore:
    return VersionedRedisTaskStore(client, prefix=prefix, owner_resolver=lambda _c: owner)


async def cancel(
    client: Client, prefix: str, owner: str, task_id: str, *, forward: bool = True
) -> tuple[int, int, bool]:
    """Cancel the owner's task: (version, state, whether the replica running it did it).

    Raises ``TaskNotFoundError``, ``ConcurrentTaskModificationError`` (already terminal) and
    ``TaskNotCancelableError`` (the replica running it refused). Round trips: 1 read, 1 GET
    of the lease; forwarded: a subscription, a PUBLISH, the answer and 1 read; else 2 per
    CAS attempt (``record_cancel``).
    """
    store, context = _store(client, prefix, owner), ServerCallContext()
    if forward:
        stored = await store.get(task_id, context)  # the owner check, as a handler's
        if stored is None:
            raise TaskNotFoundError
        if stored.task.status.state in TERMINAL_STATES:
            raise ConcurrentTaskModificationError(task_id)
        backend = RedisBackend(client, prefix=prefix)  # not a replica: it takes no leases
        try:
            done = await backend.control.forward_cancel(task_id)
        finally:
            await backend.aclose()
        if done is not None:
            after = await store.get(task_id, context)
            version = after.version if after is not None else stored.version
            return version_int(version), int(done.status.state), True
    task, version, _ = await record_cancel(store, task_id, context)
    return version_int(version), int(task.status.state), False


async def delete(client: Client, prefix: str, owner: str, task_id: str) -> bool:
    """Delete the owner's task; False if the owner has no such task."""
    records = TaskRecords(client, Options(prefix=prefix))
    if await records.read(task_id, owner) is None:
        return False
    await records.remove(task_id, owner)
    return True


async def owners(client: Client, prefix: str) -> list[str]:
    """Every owner with an index (SCAN over index keys ``P:{o:*}:all``: an admin command)."""
    keys = Keys.for_client(client, prefix)
    head = keys.scan_pattern()[:-1]
    found = set()
    async for raw in client.scan_iter(match=head + "{o:*}:all", count=1000):
        text = raw.decode() if isinstance(raw, bytes) else raw
        found.add(
            urllib.parse.unquote(text[len(prefix) + 4 : -len("}:all")], errors="surrogatepass")
        )
    return sorted(found)


async def purge(
    client: Client,
    prefix: str,
    owner: str,
    states: list[int],
    older_than: float,
    *,
    dry_run: bool = False,
    batch: int = 500,
    concurrency: int = 32,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Delete the owner's tasks in ``states`` whose status is older than ``older_than`` s.

    Returns the count per state name. Round trips: 1 ZRANGE per batch, then 2-3 per task
    (the store's delete), ``concurrency`` at a time.
    """
    records = TaskRecords(client, Options(prefix=prefix))
    keys = records.keys
    cutoff = b"(" + member_timestamp_floor(int((time.time() - older_than) * 1e9))
    slots = asyncio.Semaphore(concurrency)
    counts: dict[str, int] = {}

    async def remove(task_id: str) -> None:
        async with slots:
            await records.remove(task_id, owner)

    for state in states:
        index = keys.index(owner, state=state)
        low, done = _TIMESTAMPED, 0
        while True:
            members = cast(
                "list[bytes]",
                await client.execute_command(
                    "ZRANGE", index, low, cutoff, "BYLEX", "LIMIT", 0, batch
                ),
            )
            if not members:
                break
            ids = [member_task_id(index, m) for m in members]
            if not dry_run:
                await asyncio.gather(*(remove(t) for t in ids))
            low = b"(" + members[-1]  # past this batch (an entry with no record is skipped)
            done += len(ids)
            if progress is not None:
                progress.advance(len(ids))
        counts[TaskState.Name(state).removeprefix("TASK_STATE_").lower()] = done
    return counts


async def stats(client: Client, prefix: str, owner: str) -> dict[str, Any]:
    """The owner's task count in total and by state (index sizes: one pipelined round trip)."""
    keys = Keys.for_client(client, prefix)
    async with client.pipeline(transaction=False) as pipe:
        pipe.zcard(keys.index(owner))
        for state in STATES:
            pipe.zcard(keys.index(owner, state=state))
        total, *by_state = await execute(pipe)
    return {
        "owner": owner,
        "tasks": total,
        "by_state": {
            TaskState.Name(s).removeprefix("TASK_STATE_").lower(): n
            for s, n in zip(STATES, by_state, strict=True)
            if n
        },
    }


async def key_kinds(client: Client, prefix: str) -> dict[str, Any]:
    """The prefix's keys by kind, with their memory (``MEMORY USAGE``; None if refused).

    A SCAN of at most ``doctor.KEY_SCAN_CAP`` keys (an admin command): ``capped`` says
    whether counting stopped there.
    """
    keys = Keys.for_client(client, prefix)
    kinds: dict[str, dict[str, Any]] = {k: {"keys": 0, "bytes": 0} for k in doctor.KINDS}
    seen, capped, batch = 0, False, []
    async for raw in client.scan_iter(match=keys.scan_pattern(), count=1000):
        if seen >= doctor.KEY_SCAN_CAP:
            capped = True
            break
        seen += 1
        batch.append(raw)
        if len(batch) >= 500:
            await _measure(client, prefix, batch, kinds)
    await _measure(client, prefix, batch, kinds)
    return {"keys": seen, "capped": capped, "by_kind": kinds}


async def _measure(
    client: Client, prefix: str, batch: list[Any], kinds: dict[str, dict[str, Any]]
) -> None:
    """Count a batch of keys by kind, with their memory (one pipeline)."""
    if not batch:
        return
    async with client.pipeline(transaction=False) as pipe:
        for key in batch:
            pipe.memory_usage(key)
        usages = await pipe.execute(raise_on_error=False)
    for key, usage in zip(batch, usages, strict=True):
        entry = kinds.setdefault(doctor.key_kind(prefix, key), {"keys": 0, "bytes": 0})
        entry["keys"] += 1
        if isinstance(usage, Exception) or entry["bytes"] is None:
            entry["bytes"] = None  # MEMORY USAGE refused (a managed service): unknown
        elif isinstance(usage, int):  # (None: the key went away meanwhile)
            entry["bytes"] += usage
    batch.clear()
