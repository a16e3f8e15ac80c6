"""Push delivery's retention and cost, on every real server.

* A task without configs costs nothing more with a sender running: the same commands,
  counted at the wire (every command a connection sends, pipelines and transactions
  included) as on a replica without one, none on a push key, and no key.
* What a delivered task leaves (its per-config cursor in ``keys.push_state``) goes with the
  task's ``delete``, and follows its TTL; finished jobs leave the job stream.
* Dead letters are capped (``MAXLEN ~``) and expire.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from a2a.types.a2a_pb2 import TaskPushNotificationConfig

from a2a_redis import RedisBackend
from a2a_redis.push.dead import delivery_status
from tests.helpers import connect, ctx, eventually, numbered
from tests.push.receiver import Receiver, running_receiver
from tests.push.test_delivery import configure, run_task, sender_for
from tests.wire import tap_wire

#: Commands an idle sender's worker loops send (reading and claiming jobs): not a task's.
IDLE = {"XGROUP", "XREADGROUP", "XAUTOCLAIM"}


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, ...]]:
    """Every command any connection of this process sends from now on (``tests/wire.py``)."""
    seen: list[tuple[bytes, ...]] = []
    tap_wire(monkeypatch, lambda command: seen.append(tuple(command)))
    return seen


def _name(command: tuple[bytes, ...]) -> str:
    """The command's name (a cluster client's ``COMMAND GETKEYS X ...`` is X's)."""
    name = command[0].decode().upper()
    if name == "COMMAND" and len(command) > 2:
        return command[2].decode().upper()
    return name


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as r:
        yield r


async def test_a_task_without_configs_costs_nothing_more(
    real_url: str, prefix: str, wire: list[tuple[bytes, ...]]
) -> None:
    a = RedisBackend(connect(real_url), prefix=prefix)
    b = RedisBackend(connect(real_url), prefix=prefix)
    sender = sender_for(a)
    await sender.start()  # records deliveries, workers reading jobs
    try:
        for backend in (a, b):  # warm up: scripts loaded, listener joined
            await run_task(backend, f"warm-{id(backend)}", 1)
        await run_task(a, "quiet-a", 4)  # replica A has a sender; B has none
        for i in range(6):  # as the SDK's handler would, after each save
            await sender.send_notification("quiet-a", numbered(i, "quiet-a"))
        await run_task(b, "quiet-b", 4)

        def task_commands(task_id: bytes) -> Counter[tuple[str, int]]:
            """(command, number of arguments) of each command naming the task."""
            return Counter((c[0].decode().upper(), len(c)) for c in wire if task_id in b" ".join(c))

        # the same kinds of command (counts may differ by a transaction retried on contention)
        assert task_commands(b"quiet-a").keys() == task_commands(b"quiet-b").keys()
        assert task_commands(b"quiet-a")  # the lifecycle did send commands
        push_touched = [c for c in wire if _name(c) not in IDLE and b"push" in b" ".join(c)]
        assert push_touched == []
        keys = a.push_config_store.keys
        assert await a.redis.exists(keys.push_state("quiet-a"), keys.push_configs("quiet-a")) == 0
        assert (await delivery_status(a.redis, keys))["jobs"] == 0
    finally:
        await sender.aclose()
        for backend in (a, b):
            await backend.aclose()
            await backend.redis.aclose()


@contextlib.asynccontextmanager
async def delivered(
    url: str, prefix: str, receiver: Receiver, events: int, **options: Any
) -> AsyncIterator[RedisBackend]:
    """A backend (``options``) whose sender delivered task t1's ``events`` + 2 events."""
    backend = RedisBackend(connect(url), prefix=prefix, **options)
    sender = sender_for(backend)
    await sender.start()
    try:
        await configure(backend, "t1", receiver, "x")
        await run_task(backend, "t1", events)
        await eventually(lambda: len(receiver.delivered("x")) >= events + 2, what="deliveries")
        await eventually(lambda: sender.stats()["jobs"] == 0, what="the job ended")
        yield backend
    finally:
        await sender.aclose()
        await backend.aclose()
        await backend.redis.aclose()


async def test_delivery_state_goes_with_the_task(real_url: str, prefix: str, receiver) -> None:
    async with delivered(real_url, prefix, receiver, 2) as backend:
        keys = backend.push_config_store.keys
        status = await delivery_status(backend.redis, keys)
        assert (status["jobs"], status["pending"]) == (0, 0)  # acknowledged and deleted
        assert await backend.redis.exists(keys.push_state("t1")) == 1  # the cursor
        assert await backend.redis.pttl(keys.push_state("t1")) == -1  # as the task: kept
        await backend.task_store.delete("t1", ctx())
        assert await backend.redis.exists(keys.push_state("t1"), keys.push_configs("t1")) == 0


async def test_delivery_state_follows_the_task_ttl(real_url: str, prefix: str, receiver) -> None:
    async with delivered(real_url, prefix, receiver, 1, terminal_ttl=300) as backend:
        keys = backend.push_config_store.keys
        task_ttl = await backend.redis.pttl(keys.task("t1"))
        state_ttl = await backend.redis.pttl(keys.push_state("t1"))
        assert 0 < task_ttl <= 300_000 and 0 < state_ttl <= 300_000
        assert 0 < await backend.redis.pttl(keys.push_configs("t1")) <= 300_000


async def test_dead_letters_are_capped_and_expire(real_url: str, prefix: str) -> None:
    backend = RedisBackend(connect(real_url), prefix=prefix)
    sender = sender_for(backend, dead_maxlen=10, dead_ttl=60)
    config = TaskPushNotificationConfig(task_id="t1", id="c", url="http://127.0.0.1:9/x")
    try:
        for version in range(1, 301):
            await sender.dead_letter("t1", config, b"alice:c", version, "n", "HTTP 503", 10)
        key = backend.push_config_store.keys.push_dead
        assert await backend.redis.xlen(key) < 300  # MAXLEN ~ trims whole stream nodes
        assert 0 < await backend.redis.pttl(key) <= 60_000
        assert (await delivery_status(backend.redis, backend.push_config_store.keys))["dead"] < 300
        assert sender.stats()["dead"] == 300
    finally:
        await sender.aclose()
        await backend.aclose()
        await backend.redis.aclose()
