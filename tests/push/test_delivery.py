"""``RedisPushNotificationSender`` against a real webhook receiver, on every real server.

Two replicas (two ``RedisBackend``s on one server, each with its own sender) share the
delivery group; replica A saves the task's events (as the SDK's handler does), and the
receiver on loopback (``tests/push/receiver.py``) fails, stalls and recovers on command.
Waits are hang guards only (``eventually``), never asserted bounds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from a2a.server.cluster.version import TaskVersion
from a2a.server.events.event_queue import Event
from a2a.types.a2a_pb2 import TaskState

from a2a_redis import RedisBackend
from a2a_redis.push import RedisPushNotificationSender, RetryPolicy
from a2a_redis.push.dead import dead_letters, retry_dead
from tests.helpers import backend_pair, ctx, eventually, numbered, push_config, start_task
from tests.push.receiver import Hit, Receiver, running_receiver

TOKEN = "tok-push-5e1b-secret"
CREDENTIALS = "cred-push-9c4d-secret"
FAST = RetryPolicy(max_attempts=10, max_age=120, base_delay=0.01, max_delay=0.05)


def sender_for(backend: RedisBackend, **options: Any) -> RedisPushNotificationSender:
    settings: dict[str, Any] = {"allow_hosts": ["127.0.0.1"], "claim_after": 1.0, "retry": FAST}
    settings.update(options)
    return RedisPushNotificationSender(
        backend.redis, backend.push_config_store, backend.event_stream, **settings
    )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as r:
        yield r


@pytest.fixture
async def replicas(real_url: str, prefix: str) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    async with backend_pair(real_url, prefix) as pair:
        yield pair


async def configure(backend: RedisBackend, task_id: str, receiver: Receiver, path: str) -> None:
    config = push_config(task_id, path, TOKEN, CREDENTIALS, url=receiver.url(path))
    await backend.push_config_store.set_info(task_id, config, ctx())


async def run_task(backend: RedisBackend, task_id: str, n: int) -> TaskVersion:
    """Save the Task, ``n`` numbered WORKING updates and a COMPLETED one (n + 1)."""
    task, version = await start_task(backend.task_store, task_id)
    for i in range(n + 1):
        state = TaskState.TASK_STATE_COMPLETED if i == n else TaskState.TASK_STATE_WORKING
        event: Event = numbered(i, task_id, state)
        task.status.state = state
        version = await backend.task_store.save(
            task, event=event, prev_version=version, context=ctx()
        )
    return version


def sequence(hits: list[Hit]) -> list[str]:
    """The order of what arrived: "task", then each update's number."""
    out = []
    for hit in hits:
        event = hit.event()
        out.append("task" if event.HasField("task") else event.status_update.metadata["n"])
    return out


def expected(n: int) -> list[str]:
    return ["task", *(str(i) for i in range(n + 1))]


async def test_every_event_arrives_in_order_with_unique_ids(replicas, receiver) -> None:
    a, b = replicas
    senders = [sender_for(a), sender_for(b)]
    for s in senders:
        await s.start()
    try:
        await configure(a, "t1", receiver, "x")
        await run_task(a, "t1", 5)
        await eventually(lambda: len(receiver.delivered("x")) >= 7, what="7 deliveries")
        hits = receiver.delivered("x")
        assert sequence(hits) == expected(5)
        assert len({h.nid for h in hits}) == 7
        assert all(h.headers["x-a2a-notification-token"] == TOKEN for h in hits)
        assert all(h.headers["authorization"] == f"Bearer {CREDENTIALS}" for h in hits)
        await eventually(lambda: not any(s.stats()["jobs"] for s in senders), what="job done")
        assert await a.redis.xlen(a.push_config_store.keys.push_jobs) == 0
    finally:
        for s in senders:
            await s.aclose()


async def test_failing_receiver_gets_everything_in_order_after_retries(replicas, receiver) -> None:
    a, b = replicas
    receiver.path("x").fail_first = 3
    senders = [sender_for(a), sender_for(b)]
    for s in senders:
        await s.start()
    try:
        await configure(a, "t1", receiver, "x")
        await run_task(a, "t1", 4)
        await eventually(lambda: len(receiver.delivered("x")) >= 6, what="6 deliveries")
        hits = receiver.delivered("x")
        assert sequence(hits) == expected(4)
        assert all(receiver.path("x").attempts[h.nid] == 4 for h in hits)

        # (a sender counts a delivery once it has read the receiver's reply: just after it)
        def delivered() -> int:
            return sum(s.stats()["delivered"] for s in senders)

        await eventually(lambda: delivered() >= 6, what="6 deliveries counted")
        assert sum(s.stats()["retried"] for s in senders) == 3 * 6
        assert delivered() == 6
        # order per config: no attempt of event v+1 before event v was delivered
        first_try = [h.nid for h in receiver.hits]
        assert [n for i, n in enumerate(first_try) if n not in first_try[:i]] == [
            h.nid for h in hits
        ]
    finally:
        for s in senders:
            await s.aclose()


async def test_receiver_down_past_max_age_dead_letters_without_secrets(
    replicas, receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    a, _ = replicas
    receiver.path("x").down = True
    sender = sender_for(a, retry=RetryPolicy(max_attempts=50, max_age=0.3, base_delay=0.02))
    await sender.start()
    try:
        await configure(a, "t1", receiver, "x")
        await run_task(a, "t1", 1)
        dead_key = a.push_config_store.keys.push_dead
        await eventually(lambda: sender.stats()["dead"] >= 3, what="3 dead letters")
        rows = await a.redis.xrange(dead_key)
        assert [r[1][b"e"] for r in rows] == [b"HTTP 503"] * 3
        assert [r[1][b"v"] for r in rows] == [b"1", b"2", b"3"]
        assert len({r[1][b"n"] for r in rows}) == 3
        assert await a.redis.pttl(dead_key) > 0
        dump = repr(rows)
        assert TOKEN not in dump and CREDENTIALS not in dump and "127.0.0.1" not in dump
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert TOKEN not in logged and CREDENTIALS not in logged
    finally:
        await sender.aclose()


async def test_a_replica_that_never_calls_send_notification_loses_nothing(
    replicas, receiver
) -> None:
    a, b = replicas
    a_sender = sender_for(a)  # records deliveries, never started, never called
    b_sender = sender_for(b)
    await b_sender.start()
    try:
        await configure(a, "t1", receiver, "x")
        await run_task(a, "t1", 3)
        await eventually(lambda: len(receiver.delivered("x")) >= 5, what="5 deliveries")
        assert sequence(receiver.delivered("x")) == expected(3)
        assert a_sender.stats()["delivered"] == 0
    finally:
        await b_sender.aclose()
        await a_sender.aclose()


async def test_a_dead_replicas_jobs_are_taken_over(replicas, receiver) -> None:
    a, b = replicas
    x = receiver.path("x")
    x.stall = asyncio.Event()
    a_sender = sender_for(a, claim_after=0.5)
    await a_sender.start()
    await configure(a, "t1", receiver, "x")
    await run_task(a, "t1", 2)
    await eventually(lambda: a_sender.stats()["in_flight"] == 1, what="A posting")
    await a_sender.aclose()  # A dies mid-delivery: its job stays pending, unrenewed
    x.stall.set()
    b_sender = sender_for(b, claim_after=0.5)
    await b_sender.start()
    try:
        await eventually(lambda: len({h.nid for h in receiver.delivered("x")}) >= 4, what="all")
        hits = receiver.delivered("x")
        unique = list(dict.fromkeys(h.nid for h in hits))
        first = {h.nid: h for h in reversed(hits)}
        assert sequence([first[n] for n in unique]) == expected(2)
        assert b_sender.stats()["delivered"] >= 3
        metrics = b_sender.metrics()
        assert metrics["a2a_redis.push.claimed"] == 1  # A's one job
        assert metrics["a2a_redis.push.delivered"] == b_sender.stats()["delivered"]
        assert a_sender.stats()["claimed"] == 0
    finally:
        await b_sender.aclose()


async def test_a_slow_receiver_does_not_delay_another_task(replicas, receiver) -> None:
    a, _ = replicas
    receiver.path("slow").stall = asyncio.Event()
    sender = sender_for(a)
    await sender.start()
    try:
        await configure(a, "tx", receiver, "slow")
        await configure(a, "ty", receiver, "fast")
        await run_task(a, "tx", 2)
        await run_task(a, "ty", 2)
        await eventually(lambda: len(receiver.delivered("fast")) >= 4, what="task Y delivered")
        assert sequence(receiver.delivered("fast")) == expected(2)
        assert receiver.delivered("slow") == []
        receiver.path("slow").stall.set()
        await eventually(lambda: len(receiver.delivered("slow")) >= 4, what="task X delivered")
        assert sequence(receiver.delivered("slow")) == expected(2)
    finally:
        await sender.aclose()


async def test_refused_urls_deliver_nothing_and_are_logged_once(
    replicas, receiver, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = replicas
    sender = sender_for(a, allow_hosts=())  # the default policy
    await sender.start()
    try:
        assert not await sender.url_allowed(receiver.url("x"))
        assert not await sender.url_allowed("http://169.254.169.254/latest/meta-data")
        assert not await sender.url_allowed(f"http://localhost:{receiver.port}/x")
        assert not await sender.url_allowed("http://0.0.0.0/")
        assert not await sender.url_allowed("file:///etc/passwd")
        await configure(a, "t1", receiver, "x")
        await run_task(a, "t1", 2)
        await eventually(lambda: sender.stats()["refused"] >= 1, what="refused")
        await eventually(lambda: sender.stats()["jobs"] == 0, what="job ended")
        assert receiver.hits == []
        refusals = [r for r in caplog.records if "refused by the URL policy" in r.getMessage()]
        assert len(refusals) == 1
    finally:
        await sender.aclose()


async def test_push_retry_delivers_dead_letters_once_the_receiver_is_back(
    replicas, receiver
) -> None:
    a, b = replicas
    receiver.path("x").down = True
    short = RetryPolicy(max_attempts=3, max_age=60, base_delay=0.01, max_delay=0.02)
    senders = [sender_for(a, retry=short), sender_for(b, retry=short)]
    for s in senders:
        await s.start()
    try:
        await configure(a, "t1", receiver, "x")
        await run_task(a, "t1", 1)
        keys = a.push_config_store.keys
        await eventually(lambda: sum(s.stats()["dead"] for s in senders) >= 3, what="dead")
        letters = await dead_letters(a.redis, keys, task_id="t1")
        assert [x.version for x in letters] == [1, 2, 3]
        assert {x.error for x in letters} == {"HTTP 503"} and {x.attempts for x in letters} == {3}
        assert await dead_letters(a.redis, keys, task_id="other") == []
        receiver.path("x").down = False
        assert await retry_dead(a.redis, keys, task_id="t1") == 3
        await eventually(lambda: len(receiver.delivered("x")) >= 3, what="replayed")
        hits = receiver.delivered("x")
        assert sequence(hits) == expected(1)
        assert [h.nid for h in hits] == [x.notification_id for x in letters]
        assert await dead_letters(a.redis, keys) == []
    finally:
        for s in senders:
            await s.aclose()


_REPLICA = """
import asyncio, sys
from a2a_redis import RedisBackend
from a2a_redis.push import RedisPushNotificationSender, RetryPolicy

async def main(url, prefix):
    backend = RedisBackend.from_url(url, prefix=prefix)
    sender = RedisPushNotificationSender(
        backend.redis, backend.push_config_store, backend.event_stream,
        allow_hosts=["127.0.0.1"], claim_after=1.0,
        retry=RetryPolicy(max_attempts=10, max_age=120, base_delay=0.01, max_delay=0.05),
    )
    await sender.start()
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_sigkill_of_the_delivering_replica_another_takes_over(
    replicas, receiver, real_url: str, prefix: str
) -> None:
    import signal
    import subprocess
    import sys

    a, b = replicas
    x = receiver.path("x")
    x.stall = asyncio.Event()
    a.push_config_store.record_deliveries()  # A's handler would have a sender: it records
    await configure(a, "t1", receiver, "x")
    await run_task(a, "t1", 2)
    doomed = subprocess.Popen([sys.executable, "-c", _REPLICA, real_url, prefix])
    try:
        await eventually(lambda: sum(x.attempts.values()) >= 1, what="the replica posting")
        doomed.send_signal(signal.SIGKILL)  # mid-delivery: its request is held open
        doomed.wait(30)
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait(30)
    x.stall.set()
    survivor = sender_for(b, claim_after=1.0)
    await survivor.start()
    try:
        await eventually(lambda: len({h.nid for h in receiver.delivered("x")}) >= 4, what="all")
        hits = receiver.delivered("x")
        unique = list(dict.fromkeys(h.nid for h in hits))
        first = {h.nid: h for h in reversed(hits)}
        assert sequence([first[n] for n in unique]) == expected(2)
        assert survivor.stats()["delivered"] >= 3
    finally:
        await survivor.aclose()


async def test_a_final_4xx_is_not_retried_and_429_is_with_retry_after(replicas, receiver) -> None:
    a, _ = replicas
    receiver.path("gone").fail_status = 404
    receiver.path("gone").down = True
    busy = receiver.path("busy")
    busy.fail_status, busy.fail_first, busy.retry_after = 429, 2, "0"
    sender = sender_for(a)
    await sender.start()
    try:
        await configure(a, "t404", receiver, "gone")
        await configure(a, "t429", receiver, "busy")
        await run_task(a, "t404", 0)
        await run_task(a, "t429", 0)
        await eventually(lambda: len(receiver.delivered("busy")) >= 2, what="429 then 200")
        assert sequence(receiver.delivered("busy")) == expected(0)
        assert set(busy.attempts.values()) == {3}
        await eventually(lambda: sender.stats()["dead"] >= 2, what="404s dead-lettered")
        letters = await dead_letters(a.redis, a.push_config_store.keys, task_id="t404")
        assert [(x.version, x.error, x.attempts) for x in letters] == [
            (1, "HTTP 404", 1),
            (2, "HTTP 404", 1),
        ]
        assert set(receiver.path("gone").attempts.values()) == {1}
    finally:
        await sender.aclose()
