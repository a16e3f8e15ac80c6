"""A replica dies mid-task (SIGKILL of a real uvicorn replica) while another one's client is
subscribed: the subscriber neither hangs forever nor believes the task finished.

The replica publishing a running task's events holds the task's lease and heartbeats every
``lease_ttl / 3`` (``a2a_redis/events/leases.py``).

* ``orphan_policy="fail"`` (the default): a survivor's reaper (``events/orphans.py``) sees
  the dead replica's lapsed heartbeat and writes the task FAILED, within 3 leases; the
  subscriber's stream ends cleanly with that FAILED event, on both handlers, and GetTask
  says FAILED on every replica.
* ``"keep"``: nobody ends the task. Cluster mode: a subscriber on another replica raises
  ``OwnerLostError`` after about the lease (through the SDK's JSON-RPC routes, a JSON-RPC
  ``InternalError`` in the SSE stream, never a clean end); a cancel or a follow-up sent to
  a surviving replica recovers the task. Legacy: the remote tap closes after about the
  lease, and the stream ends with the task still WORKING.

Timeouts are hang guards only, never asserted bounds; the time from the kill to FAILED is
logged (``make bench`` measures it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from a2a.client import Client, ClientCallContext
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    TaskState,
)
from a2a.types.a2a_pb2 import TaskStatusUpdateEvent
from a2a.utils.errors import A2AError, InternalError

from a2a_redis import OwnerLostError, RedisBackend
from a2a_redis.events.orphans import LOST_REPLICA_TEXT
from a2a_redis.log.codec import version_int
from a2a_redis.log.keys import Keys
from a2a_redis.ops.embedded import EmbeddedServer
from tests.helpers import (
    ReplicaProcess,
    backend_pair,
    chunks,
    client_pair,
    connect,
    ctx,
    drain_stream,
    eventually,
    final_state,
    make_task,
    replica_pair,
    send_request,
    start_stream,
    subscribe_live,
    subscriber_count,
)

logger = logging.getLogger(__name__)
S = TaskState
GUARD = 40.0  # seconds: a hang guard only, never an asserted bound
# The lease of the in-process tests. An owner counts as alive while its heartbeats (every
# LEASE / 3) come: a subscriber would take it for dead only through an event-loop stall
# longer than about 2/3 of a lease, which this leaves far behind on a loaded machine.
LEASE = 2.0
QUIET = ClientCallContext(timeout=GUARD)  # no SSE comes while B waits for a dead owner


def working(task_id: str, state: int = S.TASK_STATE_WORKING) -> TaskStatusUpdateEvent:
    event = TaskStatusUpdateEvent(task_id=task_id, context_id="ctx")
    event.status.state = state
    return event


async def expect_released(admin: Any, prefix: str, task_id: str) -> None:
    """Wait until the dead owner's lease has lapsed and no replica listens to the task."""
    keys = Keys(prefix)

    async def released() -> bool:
        lease = await admin.get(keys.lease(task_id))
        return lease is None and await subscriber_count(admin, keys.wake(task_id)) == 0

    await eventually(released, what="the lease lapsed and B let go")


async def owner_killed_mid_stream(
    owner: ReplicaProcess, a: Client, b: Client
) -> tuple[str, list[StreamResponse], list[StreamResponse], asyncio.Task[None]]:
    """A (``owner``) streams a long task; B subscribes to it (a live chunk came); then A
    is SIGKILLed and its own client loses its stream. The task id, A's responses, B's
    (still growing) and the task draining B's stream."""
    task_id, seen_a, runner_a = await start_stream(a, "chunks=500")
    seen_b, runner_b = await subscribe_live(b, task_id, read_timeout=GUARD, guard=GUARD)
    owner.kill()
    await asyncio.gather(runner_a, return_exceptions=True)  # A's own client loses its stream
    return task_id, seen_a, seen_b, runner_b


def in_order(got: list[str], replica: str = "A") -> bool:
    return got == [f"chunk {i} from {replica}" for i in range(len(got))]


# --- two real processes, cluster mode ---------------------------------------------------


@pytest.fixture
def v2_short_lease(real_url: str, prefix: str) -> Iterator[tuple[ReplicaProcess, ReplicaProcess]]:
    with replica_pair(real_url, prefix, 0.2, "--lease-ttl", "2", "--orphan-policy", "keep") as pair:
        yield pair


@pytest.fixture
def v2_reaped(real_url: str, prefix: str) -> Iterator[tuple[ReplicaProcess, ReplicaProcess]]:
    with replica_pair(real_url, prefix, 0.2, "--lease-ttl", "2") as pair:
        yield pair


@pytest.fixture
def v2_default_lease(real_url: str, prefix: str) -> Iterator[tuple[ReplicaProcess, ReplicaProcess]]:
    with replica_pair(real_url, prefix, 0.2) as pair:  # 10 s: recovery comes first
        yield pair


@pytest.fixture
async def clients_short(v2_short_lease) -> AsyncIterator[tuple[Client, Client]]:
    async with client_pair(*v2_short_lease) as pair:
        yield pair


@pytest.fixture
async def clients_default(v2_default_lease) -> AsyncIterator[tuple[Client, Client]]:
    async with client_pair(*v2_default_lease) as pair:
        yield pair


async def test_v2_owner_killed_the_subscriber_on_b_gets_failed_and_so_does_get_task(
    v2_reaped, real_url: str, prefix: str
):
    async with client_pair(*v2_reaped) as (a, b):
        loop = asyncio.get_running_loop()
        task_id, _, seen_b, runner_b = await owner_killed_mid_stream(v2_reaped[0], a, b)
        killed = loop.time()
        await asyncio.wait_for(runner_b, GUARD)  # a clean end: the FAILED event
        logger.info("kill to FAILED on B's stream: %.2fs (lease 2s)", loop.time() - killed)

        got = chunks(seen_b)
        assert 1 <= len(got) < 500
        assert in_order(got)
        assert final_state(seen_b) == S.TASK_STATE_FAILED
        assert seen_b[-1].status_update.status.message.parts[0].text == LOST_REPLICA_TEXT
        stored = await b.get_task(GetTaskRequest(id=task_id))
        assert stored.status.state == S.TASK_STATE_FAILED
        kept = chunks([StreamResponse(task=stored)])
        assert kept == got[: len(kept)]  # what A stored stays, once
        # The task is over: a new subscription and a cancel are refused, as for any ended task.
        with pytest.raises(A2AError, match="terminal state"):
            await _collect(b.subscribe(SubscribeToTaskRequest(id=task_id), context=QUIET))
        with pytest.raises(A2AError):
            await b.cancel_task(CancelTaskRequest(id=task_id))


async def test_v2_owner_killed_under_keep_the_remote_subscriber_gets_an_error(
    v2_short_lease, clients_short, real_url: str, prefix: str
):
    a, b = clients_short
    task_id, _, seen_b, runner_b = await owner_killed_mid_stream(v2_short_lease[0], a, b)
    with pytest.raises(InternalError) as raised:  # not a clean end: the task did not finish
        await asyncio.wait_for(runner_b, GUARD)
    assert "heartbeat from the task's owner" in str(raised.value)  # OwnerLostError's text

    got = chunks(seen_b)
    assert seen_b[0].HasField("task")
    assert 1 <= len(got) < 500
    assert in_order(got)  # in order, no gap, no duplicate
    assert final_state(seen_b) == S.TASK_STATE_WORKING  # never told it finished
    stored = await b.get_task(GetTaskRequest(id=task_id))
    assert stored.status.state == S.TASK_STATE_WORKING  # nobody finished it
    admin = connect(real_url)
    try:  # A is dead: its lease lapses; B lets go of the task's channel
        await expect_released(admin, prefix, task_id)
    finally:
        await admin.aclose()

    # A new subscription on B fails the same way (after a lease), it does not hang.
    with pytest.raises(A2AError, match="owner"):
        await asyncio.wait_for(
            drain_stream(
                b.subscribe(SubscribeToTaskRequest(id=task_id), context=QUIET),
                [],
                asyncio.get_running_loop().create_future(),
            ),
            GUARD,
        )
    # ... and a cancel through B recovers the task: CANCELED is written and published.
    cancelled = await b.cancel_task(CancelTaskRequest(id=task_id))
    assert cancelled.status.state == S.TASK_STATE_CANCELED
    assert (await b.get_task(GetTaskRequest(id=task_id))).status.state == S.TASK_STATE_CANCELED


async def test_v2_owner_killed_a_cancel_on_b_ends_the_waiting_subscriber(
    v2_default_lease, clients_default
):
    a, b = clients_default
    task_id, _, seen_b, runner_b = await owner_killed_mid_stream(v2_default_lease[0], a, b)
    cancelled = await b.cancel_task(CancelTaskRequest(id=task_id))  # B: nothing runs here
    assert cancelled.status.state == S.TASK_STATE_CANCELED
    await asyncio.wait_for(runner_b, GUARD)  # the subscriber ends cleanly, at CANCELED

    assert in_order(chunks(seen_b))
    assert final_state(seen_b) == S.TASK_STATE_CANCELED
    assert (await b.get_task(GetTaskRequest(id=task_id))).status.state == S.TASK_STATE_CANCELED


async def test_v2_owner_killed_a_follow_up_on_b_runs_the_task_to_the_end(
    v2_default_lease, clients_default
):
    a, b = clients_default
    task_id, seen_a, seen_b, runner_b = await owner_killed_mid_stream(v2_default_lease[0], a, b)
    context_id = next(r.artifact_update.context_id for r in seen_a if r.HasField("artifact_update"))
    follow_up = send_request("go on, chunks=3", task_id=task_id, context_id=context_id)
    responses = await asyncio.wait_for(_collect(b.send_message(follow_up)), GUARD)
    assert chunks(responses)[-3:] == [f"chunk {i} from B" for i in range(3)]  # B ran it
    assert final_state(responses) == S.TASK_STATE_COMPLETED
    await asyncio.wait_for(runner_b, GUARD)  # the subscriber saw B's events, then the end

    # Live chunks: A's in order up to its death, then B's. (B's run also streams a Task
    # snapshot, when it saves the follow-up message into the task's history.)
    live = [
        p.text
        for r in seen_b[1:]
        if r.HasField("artifact_update")
        for p in r.artifact_update.artifact.parts
    ]
    from_a = chunks(seen_b[:1]) + [c for c in live if c.endswith("from A")]
    assert in_order(from_a)
    assert live[len(from_a) - len(chunks(seen_b[:1])) :] == [f"chunk {i} from B" for i in range(3)]
    assert final_state(seen_b) == S.TASK_STATE_COMPLETED
    assert (await b.get_task(GetTaskRequest(id=task_id))).status.state == S.TASK_STATE_COMPLETED


async def _collect(stream: AsyncIterator[StreamResponse]) -> list[StreamResponse]:
    return [r async for r in stream]


# --- two real processes, legacy handler -------------------------------------------------


@pytest.fixture
def legacy_pair(real_url: str, prefix: str) -> Iterator[tuple[ReplicaProcess, ReplicaProcess]]:
    # 1 s between chunks: B subscribes right after its client saw a chunk, and the SDK's
    # legacy snapshot-then-tap window (see tests/backend/test_legacy_handlers.py) in B's process
    # must close before A's next one; this margin is all a loaded machine has.
    with replica_pair(real_url, prefix, 1.0, "--legacy", "--lease-ttl", "2") as pair:
        yield pair


async def test_legacy_owner_killed_the_remote_tap_gets_failed_then_ends(legacy_pair):
    async with client_pair(*legacy_pair) as (a, b):
        task_id, _, seen_b, runner_b = await owner_killed_mid_stream(legacy_pair[0], a, b)
        await asyncio.wait_for(runner_b, GUARD)  # the FAILED event, then the close mark
        got = chunks(seen_b)
        assert 1 <= len(got) < 500
        assert in_order(got)
        assert final_state(seen_b) == S.TASK_STATE_FAILED
        stored = await b.get_task(GetTaskRequest(id=task_id))
        assert stored.status.state == S.TASK_STATE_FAILED


@pytest.fixture
def legacy_keep(real_url: str, prefix: str) -> Iterator[tuple[ReplicaProcess, ReplicaProcess]]:
    extra = ("--legacy", "--lease-ttl", "2", "--orphan-policy", "keep")
    with replica_pair(real_url, prefix, 1.0, *extra) as pair:
        yield pair


async def test_legacy_owner_killed_under_keep_the_remote_tap_ends_within_the_lease(
    legacy_keep, real_url: str, prefix: str
):
    legacy_pair = legacy_keep
    async with client_pair(*legacy_pair) as (a, b):
        task_id, _, seen_b, runner_b = await owner_killed_mid_stream(legacy_pair[0], a, b)
        await asyncio.wait_for(runner_b, GUARD)  # the tap closes: a clean end, no hang
        got = chunks(seen_b)
        assert 1 <= len(got) < 500
        assert in_order(got)
        assert final_state(seen_b) == S.TASK_STATE_WORKING  # nobody finished the task
    admin = connect(real_url)
    try:
        await expect_released(admin, prefix, task_id)
    finally:
        await admin.aclose()


# --- in process: the lease mechanism itself ---------------------------------------------


@pytest.fixture
async def pair(real_url: str, prefix: str) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    async with backend_pair(real_url, prefix, lease_ttl=LEASE) as replicas:
        yield replicas


async def start_running(a: RedisBackend, task_id: str) -> TaskVersion:
    """A's "agent" creates the task and reports WORKING, saving and publishing as the SDK."""
    task = make_task(task_id)
    version = await a.task_store.save(
        task, event=task, prev_version=TaskVersion.MISSING, context=ctx()
    )
    await a.event_stream.publish(task_id, VersionedEvent(task, version))
    task.status.state = S.TASK_STATE_WORKING
    event = working(task_id)
    version = await a.task_store.save(task, event=event, prev_version=version, context=ctx())
    await a.event_stream.publish(task_id, VersionedEvent(event, version))
    return version


async def listening(backend: RedisBackend, task_id: str) -> None:
    """Wait until ``backend``'s listener is subscribed to the task on the server."""
    channel = backend.task_store.keys.wake(task_id)
    await eventually(lambda: subscriber_count(backend.redis, channel), what="subscribed")


async def test_heartbeats_keep_a_quiet_subscriber_waiting_then_owner_loss_ends_it(pair):
    a, b = pair
    version = await start_running(a, "t")
    assert a.leases.holds("t")
    subscription = b.event_stream.subscribe("t", after=version)
    pending = asyncio.ensure_future(subscription.__anext__())
    await listening(b, "t")  # B's wait for the owner has begun
    await asyncio.sleep(LEASE * 1.5)  # more than a lease without an event: heartbeats only
    assert not pending.done()
    assert await a.redis.get(a.task_store.keys.lease("t")) is not None  # A holds it still
    assert a.leases.drop("t") is not None  # A dies: no renewal, no heartbeat
    with pytest.raises(OwnerLostError, match="owner"):
        await asyncio.wait_for(pending, GUARD)
    await subscription.aclose()
    assert b.listener.stats()["subscribers"] == 0


async def test_a_task_waiting_for_input_has_no_owner_and_its_subscriber_waits(pair):
    a, b = pair
    version = await start_running(a, "t")
    task = make_task("t", state=S.TASK_STATE_INPUT_REQUIRED)
    asked = working("t", S.TASK_STATE_INPUT_REQUIRED)
    version = await a.task_store.save(task, event=asked, prev_version=version, context=ctx())
    await a.event_stream.publish("t", VersionedEvent(asked, version))
    assert not a.leases.holds("t")  # nobody runs a task that waits for the user
    subscription = b.event_stream.subscribe("t", after=version)
    pending = asyncio.ensure_future(subscription.__anext__())
    await listening(b, "t")
    await asyncio.sleep(LEASE * 1.5)  # more than a lease (a slower machine waits longer)
    assert not pending.done()  # no owner is expected: no OwnerLostError
    # The answer comes through B (a follow-up): B runs the task now.
    task.status.state = S.TASK_STATE_WORKING
    resumed = working("t")
    version = await b.task_store.save(task, event=resumed, prev_version=version, context=ctx())
    await b.event_stream.publish("t", VersionedEvent(resumed, version))
    assert (await asyncio.wait_for(pending, GUARD)).version == version
    assert b.leases.holds("t")
    await subscription.aclose()


async def test_a_failed_write_that_is_never_published_still_drops_the_lease(pair, real_url):
    """The SDK writes FAILED without publishing it: the renewal sees the record and lets go."""
    a, _ = pair
    version = await start_running(a, "t")
    task = make_task("t", state=S.TASK_STATE_FAILED)
    await a.task_store.save(
        task, event=working("t", S.TASK_STATE_FAILED), prev_version=version, context=ctx()
    )
    await eventually(lambda: not a.leases.holds("t"), what="the next renewal drops it")
    assert len(a.leases) == 0
    assert await a.redis.get(a.task_store.keys.lease("t")) is None


async def test_a_remote_cancel_drops_the_runners_lease_at_its_next_renewal(pair):
    a, b = pair
    version = await start_running(a, "t")
    task = make_task("t", state=S.TASK_STATE_CANCELED)
    cancel = working("t", S.TASK_STATE_CANCELED)
    version = await b.task_store.save(task, event=cancel, prev_version=version, context=ctx())
    await b.event_stream.publish("t", VersionedEvent(cancel, version))
    await eventually(lambda: not a.leases.holds("t"), what="A's next renewal drops it")
    assert not b.leases.holds("t")


async def test_subscribers_wait_through_an_outage_longer_than_the_lease(
    durable_server: EmbeddedServer, prefix: str
):
    """Silence counts only while the subscriber's own connection is up (see the listener)."""
    server = durable_server
    async with backend_pair(server.url, prefix, lease_ttl=LEASE) as (a, b):
        version = await start_running(a, "t")
        # From one version back: its first event proves the backlog was read, so B is
        # following (a subscribe still reading its backlog when Redis dies fails instead).
        subscription = b.event_stream.subscribe("t", after=TaskVersion(version_int(version) - 1))
        assert (await asyncio.wait_for(subscription.__anext__(), GUARD)).version == version
        pending = asyncio.ensure_future(subscription.__anext__())
        await listening(b, "t")
        server.kill()
        await eventually(lambda: not b.listener.connected, what="B sees the outage")
        await asyncio.sleep(LEASE * 1.5)  # more than a lease with nothing reaching anyone
        assert not pending.done()
        server.start()
        await eventually(lambda: b.listener.connected, what="B reconnects")
        await listening(b, "t")  # re-subscribed: silence counts again from here
        await asyncio.sleep(LEASE * 1.5)  # more than a lease after: A's heartbeats are back
        assert not pending.done()
        assert b.listener.stats()["reconnects"] >= 1
        task = make_task("t", state=S.TASK_STATE_COMPLETED)
        done = working("t", S.TASK_STATE_COMPLETED)
        version = await a.task_store.save(task, event=done, prev_version=version, context=ctx())
        await a.event_stream.publish("t", VersionedEvent(done, version))
        assert (await asyncio.wait_for(pending, GUARD)).version == version
        await subscription.aclose()
        assert len(a.leases) == 0


async def test_a_corrupt_record_or_lease_does_not_stop_other_tasks_heartbeats(pair):
    """One task's keys of the wrong type (planted) must not stop the renewal of the others'."""
    a, b = pair
    await start_running(a, "bad")
    version = await start_running(a, "good")
    done_version = await start_running(a, "done")
    keys = a.task_store.keys
    await a.redis.delete(keys.task("bad"))
    await a.redis.rpush(keys.task("bad"), b"not a hash")  # a corrupt record
    await a.redis.delete(keys.lease("bad"))
    await a.redis.hset(keys.lease("bad"), b"f", b"not a string")  # and a corrupt lease
    subscription = b.event_stream.subscribe("good", after=version)
    pending = asyncio.ensure_future(subscription.__anext__())
    await listening(b, "good")
    await asyncio.sleep(LEASE * 1.5)  # more than a lease: "good"'s heartbeats keep coming
    assert not pending.done()
    assert a.leases.holds("good")
    assert await a.redis.get(keys.lease("good")) is not None
    # ... and a task that settles meanwhile (a FAILED write, never published) is let go.
    task = make_task("done", state=S.TASK_STATE_FAILED)
    failed = working("done", S.TASK_STATE_FAILED)
    await a.task_store.save(task, event=failed, prev_version=done_version, context=ctx())
    await eventually(lambda: not a.leases.holds("done"), what="the next renewal drops it")
    # Subscribing to the task with the corrupt record still works (it reads the stream).
    bad = b.event_stream.subscribe("bad", after=TaskVersion(2))
    await a.event_stream.publish("bad", VersionedEvent(working("bad"), TaskVersion(3)))
    assert (await asyncio.wait_for(bad.__anext__(), GUARD)).version == TaskVersion(3)
    await bad.aclose()
    pending.cancel()
    await asyncio.gather(pending, return_exceptions=True)
    await subscription.aclose()


async def test_after_close_a_late_publish_holds_no_lease(pair):
    a, _ = pair
    version = await start_running(a, "t")
    assert a.leases.renewing
    await a.leases.aclose()  # released, and no renewal loop is left running
    assert await a.redis.get(a.task_store.keys.lease("t")) is None
    event = working("t")
    task = make_task("t", state=S.TASK_STATE_WORKING)
    version = await a.task_store.save(task, event=event, prev_version=version, context=ctx())
    await a.event_stream.publish("t", VersionedEvent(event, version))
    assert len(a.leases) == 0
    assert not a.leases.renewing
