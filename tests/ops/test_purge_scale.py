"""``a2a-redis purge`` at scale: 100,000 tasks, of which it removes only those that match,
in batches, driven by the ListTasks indexes: every command this process sends is read off
the wire (``send_packed_command``), and none is a KEYS or a SCAN over tasks.

The tasks are written in bulk (pipelines of the store's own commit bodies and index
commands, ``TaskRecords._write_commands``), not saved one by one: the same keys and index entries as
a save, at a fraction of the round trips.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import ListTasksRequest, Task, TaskState, TaskStatus

from a2a_redis.options import Options
from a2a_redis.stores.records import TaskRecords
from a2a_redis.stores.save_body import SAVE
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from tests.helpers import NamedUser, connect
from tests.ops.test_migrate import run_cli as cli
from tests.wire import resp_commands, tap_wire

S = TaskState
N = 100_000
DAY_NS = 86_400 * 1_000_000_000
CYCLE = [S.TASK_STATE_COMPLETED, S.TASK_STATE_FAILED, S.TASK_STATE_WORKING, S.TASK_STATE_CANCELED]


def state_of(i: int) -> int:
    return CYCLE[i % 4]


def old(i: int) -> bool:
    """40 days old (2 in 5), else 1 day."""
    return i % 5 < 2


def matches(i: int) -> bool:  # --state completed,failed --older-than 30d
    return state_of(i) in (S.TASK_STATE_COMPLETED, S.TASK_STATE_FAILED) and old(i)


async def bulk_seed(
    client: aioredis.Redis, prefix: str, owner: str, n: int, age: Callable[[int], bool]
) -> None:
    """``n`` tasks of ``owner`` (``owner-i``), pipelined 2,000 at a time."""
    records = TaskRecords(client, Options(prefix=prefix))
    await client.script_load(SAVE.source)
    now = time.time_ns()
    for start in range(0, n, 2_000):
        async with client.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + 2_000)):
                task = Task(id=f"{owner}-{i:06d}", context_id=f"c{i % 10}")
                task.status.CopyFrom(TaskStatus(state=state_of(i)))  # type: ignore[arg-type]
                task.status.timestamp.FromNanoseconds(now - (40 if age(i) else 1) * DAY_NS + i)
                batch, index_cmds, _ = records._write_commands(
                    records._frame(task.id), task, task.SerializeToString(), owner, 1,
                    os.urandom(8), None, None,
                )  # fmt: skip
                name, *args = next(resp_commands(batch.packed()))  # the commit's EVALSHA
                pipe.execute_command(name.decode(), *args)  # (a cluster client wants a str name)
                for cmd in index_cmds:
                    pipe.execute_command(*cmd)
            await pipe.execute()


class Wire(collections.Counter[bytes]):
    """Commands sent, by name; and the keys read (HMGET) and SCAN patterns."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[bytes] = set()
        self.scans: list[bytes] = []

    def reset(self) -> None:
        self.clear()
        self.read.clear()
        self.scans.clear()


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> Wire:
    """Every command this process sends to Redis, read off the wire (``tests/wire.py``)."""
    seen = Wire()

    def count(command: list[bytes]) -> None:
        name, argv = command[0].upper(), command[1:]
        seen[name] += 1
        if name == b"HMGET":
            seen.read.add(argv[0])
        elif name == b"SCAN":
            seen.scans.append(argv[argv.index(b"MATCH") + 1])

    tap_wire(monkeypatch, count)
    return seen


@pytest.mark.timeout(600)
def test_purge_of_100k_tasks_is_index_driven_batched_and_exact(
    real_url: str, prefix: str, wire: Wire
) -> None:
    async def seed() -> None:
        client = connect(real_url)
        try:
            await bulk_seed(client, prefix, "alice", N, old)
            await bulk_seed(client, prefix, "bob", 300, lambda _i: True)  # another owner's
        finally:
            await client.aclose()

    asyncio.run(seed())
    matching = sum(map(matches, range(N)))
    assert matching == 20_000
    base = ["--url", real_url, "--prefix", prefix, "--json"]
    argv = ["purge", "--owner", "alice", "--state", "completed,failed", "--older-than", "30d"]

    wire.reset()
    code, dry = cli([*argv, "--dry-run", *base])
    assert code == 0 and dry["owners"] == {"alice": {"completed": 10_000, "failed": 10_000}}
    assert wire[b"ZRANGE"] == 2 * (10_000 // 500 + 1) and wire[b"HMGET"] == 0

    wire.reset()
    code, done = cli([*argv, *base])
    assert code == 0 and done["total"] == matching
    # index-driven: no KEYS, no SCAN; a ZRANGE per batch of 500 (and one that finds the
    # end) per state; and only the tasks it deletes are read
    assert wire[b"KEYS"] == 0 and wire[b"SCAN"] == 0
    assert wire[b"ZRANGE"] == 2 * (10_000 // 500 + 1)
    read = set(wire.read)

    async def check() -> None:
        client = connect(real_url)
        try:
            store = VersionedRedisTaskStore(client, prefix=prefix)
            alice = ServerCallContext(user=NamedUser("alice"))
            totals = {}
            for state in (0, *CYCLE):
                request = ListTasksRequest(page_size=1, status=state)  # type: ignore[arg-type]
                totals[state] = (await store.list(request, alice)).total_size
            assert totals == {
                0: N - matching,
                S.TASK_STATE_COMPLETED: 15_000,  # of 25,000: the 10,000 old ones went
                S.TASK_STATE_FAILED: 15_000,
                S.TASK_STATE_WORKING: 25_000,  # not a purged state
                S.TASK_STATE_CANCELED: 25_000,  # old too, but not asked for
            }
            context = await store.list(ListTasksRequest(context_id="c0", page_size=1), alice)
            assert context.total_size == sum(1 for i in range(0, N, 10) if not matches(i))
            bob = ServerCallContext(user=NamedUser("bob"))
            assert (await store.list(ListTasksRequest(), bob)).total_size == 300
            keys = TaskRecords(client, Options(prefix=prefix)).keys
            deleted = {keys.task(f"alice-{i:06d}").encode() for i in range(N) if matches(i)}
            assert read == deleted
            sample = range(0, N, 997)
            present = [await client.exists(keys.task(f"alice-{i:06d}")) for i in sample]
            assert present == [0 if matches(i) else 1 for i in sample]
        finally:
            await client.aclose()

    asyncio.run(check())

    # --all-owners finds the owners with one SCAN over their index keys, never over tasks
    wire.reset()
    code, everyone = cli(["purge", "--all-owners", "--older-than", "30d", "--dry-run", *base])
    assert code == 0 and everyone["owners"]["bob"] == {"completed": 75, "failed": 75,
                                                       "canceled": 75, "rejected": 0}  # fmt: skip
    assert everyone["owners"]["alice"]["canceled"] == 10_000 and wire[b"KEYS"] == 0
    assert wire.scans and all(p.endswith(b"{o:*}:all") for p in wire.scans), wire.scans
