"""Push delivery across two real replica processes, driven by the official a2a client.

Each replica is ``tests/push/replica.py`` (``examples/agent_server.py``'s agent, a card that
declares push notifications, so ``backend.request_handler`` wires the Redis sender); the
client streams a task whose message registers a push config for the real receiver on
loopback (``tests/push/receiver.py``). What the receiver gets is compared with what the
client's stream got: the same events, in the same order. Waits are hang guards only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from a2a.types.a2a_pb2 import StreamResponse, TaskState

from a2a_redis.log.keys import Keys
from a2a_redis.ops.cli import main
from a2a_redis.push.dead import dead_letters
from tests.helpers import (
    ROOT,
    ReplicaProcess,
    client_pair,
    connect,
    eventually,
    free_port,
    push_config,
    replica_pair,
    send_request,
)
from tests.push.receiver import Hit, Receiver, running_receiver
from tests.push.test_delivery import CREDENTIALS, TOKEN


class PushReplica(ReplicaProcess):
    """``tests/push/replica.py`` in its own process; :attr:`consumer` names its sender."""

    def __init__(self, name: str, redis_url: str, prefix: str, folder: Path, *extra: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.consumer_file = folder / f"{name}.consumer"
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "push" / "replica.py"), "--port", str(self.port),
             "--redis-url", redis_url, "--prefix", prefix, "--name", name,
             "--consumer-file", str(self.consumer_file), *extra],
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip

    @property
    def consumer(self) -> str:
        return self.consumer_file.read_text()


@contextlib.contextmanager
def push_pair(
    url: str, prefix: str, folder: Path, *extra: str
) -> Iterator[tuple[PushReplica, PushReplica]]:
    """Replicas "A" and "B" (``extra``: sender options), ready; stopped afterwards."""

    def make(name: str, url: str, prefix: str, delay: float, *extra: str) -> PushReplica:
        return PushReplica(name, url, prefix, folder, *extra)

    with replica_pair(url, prefix, 0.05, *extra, kind=make) as pair:
        yield cast("tuple[PushReplica, PushReplica]", pair)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as r:
        yield r


def signature(event: StreamResponse) -> tuple[Any, ...]:
    """What an event says: its kind, and its state or its artifact's text."""
    if event.HasField("task"):
        return ("task", event.task.id, event.task.status.state)
    if event.HasField("status_update"):
        return ("status", event.status_update.task_id, event.status_update.status.state)
    update = event.artifact_update
    return ("artifact", update.task_id, tuple(p.text for p in update.artifact.parts))


def firsts(hits: list[Hit]) -> list[Hit]:
    """The first 2xx-answered hit of each notification id, in arrival order."""
    seen: dict[str, Hit] = {}
    for hit in hits:
        seen.setdefault(hit.nid, hit)
    return list(seen.values())


async def stream_with_push(client: Any, text: str, receiver: Receiver) -> list[StreamResponse]:
    """Stream ``text`` with a push config for ``receiver``'s ``/x``; the client's events."""
    config = push_config("", "hook", TOKEN, CREDENTIALS, url=receiver.url("x"))
    request = send_request(text, config)
    return [r async for r in client.send_message(request) if r.WhichOneof("payload") != "message"]


async def assert_all_delivered(receiver: Receiver, streamed: list[StreamResponse]) -> None:
    """The receiver gets every event the client streamed, in order, each id once."""
    await eventually(
        lambda: len(firsts(receiver.delivered("x"))) >= len(streamed), what="every event"
    )
    hits = firsts(receiver.delivered("x"))
    assert [signature(h.event()) for h in hits] == [signature(e) for e in streamed]
    assert all(h.headers["x-a2a-notification-token"] == TOKEN for h in hits)
    assert all(h.headers["authorization"] == f"Bearer {CREDENTIALS}" for h in hits)


async def test_every_event_arrives_in_order_with_unique_ids(
    real_url: str, prefix: str, receiver: Receiver, tmp_path: Path
) -> None:
    with push_pair(real_url, prefix, tmp_path) as (a, b):
        async with client_pair(a, b) as (ca, _):
            streamed = await stream_with_push(ca, "chunks=5", receiver)
            assert signature(streamed[-1])[2] == TaskState.TASK_STATE_COMPLETED
            await assert_all_delivered(receiver, streamed)
            hits = receiver.delivered("x")
            assert len({h.nid for h in hits}) == len(hits) == len(streamed)  # no duplicate


async def test_a_receiver_failing_three_times_gets_everything_in_order(
    real_url: str, prefix: str, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.path("x").fail_first = 3
    with push_pair(real_url, prefix, tmp_path) as (a, b):
        async with client_pair(a, b) as (_, cb):
            streamed = await stream_with_push(cb, "chunks=4", receiver)
            await assert_all_delivered(receiver, streamed)
            attempts = receiver.path("x").attempts
            assert [attempts[h.nid] for h in receiver.delivered("x")] == [4] * len(streamed)
            first_try = list(dict.fromkeys(h.nid for h in receiver.hits))  # order of 1st tries
            assert first_try == [h.nid for h in receiver.delivered("x")]


async def test_a_receiver_down_past_max_age_gets_its_dead_letters_after_push_retry(
    real_url: str, prefix: str, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.path("x").down = True
    options = ("--max-age", "0.3", "--max-attempts", "1000")
    with push_pair(real_url, prefix, tmp_path, *options) as (a, b):
        async with client_pair(a, b) as (ca, _):
            streamed = await stream_with_push(ca, "chunks=2", receiver)
            task_id = signature(streamed[0])[1]
            redis = connect(real_url)
            try:
                keys = Keys.for_client(redis, prefix)
                n = len(streamed)
                await eventually(
                    lambda: has_dead(redis, keys, task_id, n), what="a dead letter per event"
                )
                letters = await dead_letters(redis, keys, task_id=task_id)
                assert [x.version for x in letters] == sorted(x.version for x in letters)
                assert len(letters) == n and {x.error for x in letters} == {"HTTP 503"}
                assert receiver.delivered("x") == []
                receiver.path("x").down = False
                argv = ["push", "retry", "--url", real_url, "--prefix", prefix]
                assert await asyncio.to_thread(main, argv) == 0
                await assert_all_delivered(receiver, streamed)
                assert [h.nid for h in receiver.delivered("x")] == [
                    x.notification_id for x in letters
                ]
                assert await dead_letters(redis, keys) == []
            finally:
                await redis.aclose()


async def test_sigkill_of_the_delivering_replica_the_other_delivers(
    real_url: str, prefix: str, receiver: Receiver, tmp_path: Path
) -> None:
    x = receiver.path("x")
    x.stall = asyncio.Event()
    with push_pair(real_url, prefix, tmp_path, "--claim-after", "1") as (a, b):
        async with client_pair(a, b) as (ca, _):
            streamed = await stream_with_push(ca, "chunks=3", receiver)
            await eventually(lambda: sum(x.attempts.values()) >= 1, what="a delivery held")
            redis = connect(real_url)
            try:
                jobs = Keys.for_client(redis, prefix).push_jobs
                pending = await redis.xpending_range(jobs, "a2a-push", "-", "+", 10)
                assert len(pending) == 1  # one job: (task, config)
                holder = pending[0]["consumer"].decode()
                doomed, survivor = (a, b) if holder == a.consumer else (b, a)
                assert holder == doomed.consumer
                doomed.kill()  # mid-delivery: its POST is held open by the receiver
                x.stall.set()
                await assert_all_delivered(receiver, streamed)
                await eventually(
                    lambda: no_pending(redis, jobs), what="the job acknowledged by the survivor"
                )
                assert survivor.proc.poll() is None
            finally:
                await redis.aclose()


async def has_dead(redis: Any, keys: Keys, task_id: str, n: int) -> bool:
    return len(await dead_letters(redis, keys, task_id=task_id)) >= n


async def no_pending(redis: Any, jobs: str) -> bool:
    return not await redis.xpending_range(jobs, "a2a-push", "-", "+", 10)
