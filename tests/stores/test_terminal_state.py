"""A terminal state is final, in both task stores (A2A: a terminal task cannot be restarted).

A save that would change a stored COMPLETED, CANCELED, FAILED or REJECTED state to any
other state raises ``TerminalStateError`` naming the task's key and writes nothing: not the
record, not a stream entry, not an index entry. A save in the same terminal state is an
ordinary write. The error is also the SDK's ``ConcurrentTaskModificationError``, so the
SDK's cluster-mode consumer reloads, finds the terminal task and stops its producer.

A deliberate difference from the SDK: its ``InMemoryTaskStore`` (and its SQL stores, whose
versioned save checks only the version) accept such a save and restart the task.
``test_the_sdk_in_memory_store_does_not_enforce_it`` shows the two side by side.

The contract tests run on every server and on fakeredis; the races on real servers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from a2a.server.cluster import ConcurrentTaskModificationError, TaskVersion
from a2a.server.tasks import InMemoryTaskStore
from a2a.types.a2a_pb2 import (
    Artifact,
    ListTasksRequest,
    Part,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatusUpdateEvent,
)

import a2a_redis
from a2a_redis.connection.transaction import WatchedTransaction
from a2a_redis.errors import A2ARedisError, CorruptDataError, TerminalStateError
from a2a_redis.log.codec import TERMINAL_STATES, decode_event, decode_head, version_int
from a2a_redis.log.keys import Keys
from a2a_redis.stores.task_store import RedisTaskStore, VersionedRedisTaskStore
from tests.helpers import connect, ctx, make_task

S = TaskState
MISSING = TaskVersion.MISSING
TERMINAL = sorted(TERMINAL_STATES)
ALL_STATES = sorted(TaskState.values())
PAIRS = [
    pytest.param(old, new, id=f"{TaskState.Name(old)[11:]}->{TaskState.Name(new)[11:]}")
    for old in TERMINAL
    for new in ALL_STATES
    if new != old
]
KINDS = ["versioned", "plain"]


def status_event(task_id: str, state: int, writer: str = "") -> TaskStatusUpdateEvent:
    event = TaskStatusUpdateEvent(task_id=task_id, context_id="ctx")
    event.status.state = state
    if writer:
        event.metadata["writer"] = writer
    return event


@pytest.fixture
def store(redis: aioredis.Redis, prefix: str) -> VersionedRedisTaskStore:
    return VersionedRedisTaskStore(redis, prefix=prefix)


async def _seed(store: VersionedRedisTaskStore, task_id: str, state: int) -> TaskVersion:
    """A task that went SUBMITTED -> ``state``, each write with its event: version 2."""
    v1 = await store.save(
        make_task(task_id), event=make_task(task_id), prev_version=MISSING, context=ctx()
    )
    return await store.save(
        make_task(task_id, state=state, ts_ns=7),
        event=status_event(task_id, state),
        prev_version=v1,
        context=ctx(),
    )


async def _save(
    store: VersionedRedisTaskStore, kind: str, task: Task, version: TaskVersion
) -> TaskVersion | None:
    """Save through the versioned store (with an event) or its plain view."""
    if kind == "plain":
        await store.as_task_store.save(task, ctx())
        return None
    event = status_event(task.id, task.status.state)
    return await store.save(task, event=event, prev_version=version, context=ctx())


async def _snapshot(redis: aioredis.Redis, prefix: str) -> dict[bytes, Any]:
    """Every key of the test's namespace with its type, contents and expiry (SCAN, no KEYS)."""
    found: dict[bytes, Any] = {}
    async for key in redis.scan_iter(match=Keys(prefix).scan_pattern(), count=500):
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            value: Any = await redis.hgetall(key)
        elif kind == "zset":
            value = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = await redis.xrange(key)
        elif kind == "string":
            value = await redis.get(key)
        else:
            raise AssertionError(f"unexpected {kind} at {key!r}")
        found[key] = (kind, value, await redis.pttl(key) > 0)
    return found


# -- the error -------------------------------------------------------------------------------
def test_the_error_is_ours_and_the_sdks_conflict() -> None:
    e = TerminalStateError(
        "t1", key="a2a:{t:t1}:task", stored_state=S.TASK_STATE_COMPLETED,
        refused_state=S.TASK_STATE_WORKING,
    )  # fmt: skip
    assert isinstance(e, A2ARedisError)
    assert isinstance(e, ConcurrentTaskModificationError)
    assert a2a_redis.TerminalStateError is TerminalStateError
    assert "TerminalStateError" in a2a_redis.__all__
    assert e.task_id == "t1"  # the SDK's attribute, not its message
    assert e.key == "a2a:{t:t1}:task"
    assert (e.stored_state, e.refused_state) == (S.TASK_STATE_COMPLETED, S.TASK_STATE_WORKING)
    text = str(e)  # the SDK's consumer turns it into InternalError(message=str(e))
    for part in ("'t1'", "TASK_STATE_COMPLETED", "TASK_STATE_WORKING", "'a2a:{t:t1}:task'"):
        assert part in text
    assert "cannot be restarted" in text
    assert e.args == (text,)
    assert "modified concurrently" not in text
    odd = TerminalStateError("t", key=None, stored_state=3, refused_state=42)
    assert "state 42" in str(odd)
    assert "key" not in str(odd)


# -- refusals: every terminal state x every other state, both stores ---------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("old", "new"), PAIRS)
async def test_leaving_a_terminal_state_is_refused_and_writes_nothing(
    store: VersionedRedisTaskStore,
    redis: aioredis.Redis,
    prefix: str,
    kind: str,
    old: int,
    new: int,
) -> None:
    version = await _seed(store, "t", old)
    await store.save(make_task("n"), prev_version=MISSING, context=ctx())  # a neighbour
    before = await _snapshot(redis, prefix)
    listed = await store.list(ListTasksRequest(), ctx())
    with pytest.raises(TerminalStateError) as info:
        await _save(store, kind, make_task("t", state=new, ts_ns=9), version)
    e = info.value
    assert e.key == store.keys.task("t")
    assert store.keys.task("t") in str(e)
    assert (e.task_id, e.stored_state, e.refused_state) == ("t", old, new)
    assert await _snapshot(redis, prefix) == before  # record, stream, indexes, expiries
    assert await store.list(ListTasksRequest(), ctx()) == listed
    stored = await store.get("t", ctx())
    assert stored is not None
    assert (stored.task.status.state, stored.version) == (old, version)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stale_or_missing_version_gets_the_terminal_error_too(
    store: VersionedRedisTaskStore, kind: str
) -> None:
    """Whatever the version, leaving a terminal state is refused (re-reading cannot help)."""
    await _seed(store, "t", S.TASK_STATE_COMPLETED)
    for version in (MISSING, TaskVersion(1), TaskVersion(99)):
        with pytest.raises(TerminalStateError):
            await _save(store, kind, make_task("t", state=S.TASK_STATE_WORKING), version)


# -- what stays allowed --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("state", [pytest.param(s, id=TaskState.Name(s)[11:]) for s in TERMINAL])
async def test_the_same_terminal_state_may_be_written_again(
    store: VersionedRedisTaskStore, redis: aioredis.Redis, kind: str, state: int
) -> None:
    """E.g. the SDK saving a COMPLETED task again with its last artifact."""
    version = await _seed(store, "t", state)
    task = make_task("t", state=state, ts_ns=8)
    task.artifacts.append(Artifact(artifact_id="a", parts=[Part(text="last")]))
    if kind == "plain":
        await store.as_task_store.save(task, ctx())
        await store.as_task_store.save(task, ctx())  # and again: two writers recording it
        expected = 4
    elif state == S.TASK_STATE_CANCELED:
        # The SDK's rule for cancels stays: a CANCELED write over a terminal task conflicts,
        # with the SDK's own error (it does not leave the terminal state).
        with pytest.raises(ConcurrentTaskModificationError) as info:
            await store.save(task, prev_version=version, context=ctx())
        assert not isinstance(info.value, TerminalStateError)
        stored = await store.get("t", ctx())
        assert stored is not None
        assert stored.version == version
        return
    else:
        event = TaskArtifactUpdateEvent(task_id="t", context_id="ctx", artifact=task.artifacts[0])
        new = await store.save(task, event=event, prev_version=version, context=ctx())
        assert new == TaskVersion(3)
        with pytest.raises(ConcurrentTaskModificationError) as info:  # versions still count
            await store.save(task, prev_version=version, context=ctx())
        assert not isinstance(info.value, TerminalStateError)
        key = store.keys.events("t")
        log = [decode_event(key, f) for _, f in await redis.xrange(key)]
        assert [v for v, _ in log] == [1, 2, 3]
        assert log[-1][1] == event
        expected = 3
    stored = await store.get("t", ctx())
    assert stored is not None
    assert stored.task == task
    assert stored.version == TaskVersion(expected)


async def test_the_sdk_cancel_rules_are_unchanged(store: VersionedRedisTaskStore) -> None:
    """CANCELED skips the version check on a non-terminal task, conflicts on an absent one,
    and is refused as a change of state on another terminal state."""
    with pytest.raises(ConcurrentTaskModificationError) as absent:
        await store.save(
            make_task("t", state=S.TASK_STATE_CANCELED), prev_version=MISSING, context=ctx()
        )
    assert not isinstance(absent.value, TerminalStateError)
    v2 = await _seed(store, "t", S.TASK_STATE_WORKING)
    assert await store.save(
        make_task("t", state=S.TASK_STATE_CANCELED), prev_version=TaskVersion(1), context=ctx()
    ) == TaskVersion(3)  # fmt: skip
    assert v2 == TaskVersion(2)
    await _seed(store, "u", S.TASK_STATE_COMPLETED)
    with pytest.raises(TerminalStateError):
        await store.save(
            make_task("u", state=S.TASK_STATE_CANCELED), prev_version=TaskVersion(2), context=ctx()
        )


async def test_another_owners_terminal_task_is_not_described(store: VersionedRedisTaskStore):
    """The owner check comes first: another owner learns nothing of the task's state."""
    await _seed(store, "t", S.TASK_STATE_COMPLETED)
    with pytest.raises(a2a_redis.TaskOwnedElsewhereError):
        await store.as_task_store.save(make_task("t", state=S.TASK_STATE_WORKING), ctx("bob"))
    with pytest.raises(ConcurrentTaskModificationError) as info:
        await store.save(
            make_task("t", state=S.TASK_STATE_WORKING), prev_version=MISSING, context=ctx("bob")
        )
    assert not isinstance(info.value, TerminalStateError)


async def test_a_deleted_terminal_task_id_can_be_used_again(store: VersionedRedisTaskStore):
    await _seed(store, "t", S.TASK_STATE_FAILED)
    await store.delete("t", ctx())
    assert await store.save(make_task("t"), prev_version=MISSING, context=ctx()) == TaskVersion(1)


# -- bad data stays typed ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [None, b"", b" 3", b"3 ", b"+3", b"0_3", b"03x", b"3.0", b"\xd9\xa3", b"2147483651", b"-"],
)
@pytest.mark.parametrize("kind", KINDS)
async def test_a_corrupt_state_field_is_corrupt_data_not_a_state(
    store: VersionedRedisTaskStore,
    redis: aioredis.Redis,
    prefix: str,
    kind: str,
    raw: bytes | None,
) -> None:
    """Python's int() reads b" 3", b"+3" and b"0_3" as 3 (COMPLETED): the store must not."""
    version = await _seed(store, "t", S.TASK_STATE_WORKING)
    key = store.keys.task("t")
    if raw is None:
        await redis.hdel(key, b"s")
    else:
        await redis.hset(key, b"s", raw)
    before = await _snapshot(redis, prefix)
    for state in (S.TASK_STATE_WORKING, S.TASK_STATE_COMPLETED):
        with pytest.raises(CorruptDataError) as info:
            await _save(store, kind, make_task("t", state=state), version)
        assert not isinstance(info.value, TerminalStateError)
        assert info.value.key == key
    assert await _snapshot(redis, prefix) == before


def test_decode_head_reads_only_a_plain_decimal_state() -> None:
    head = [b"1", b"alice", b"2", b"ctx", b"3", b"\x00" * 17 + b"t", b"w" * 8, b"0"]
    decoded = decode_head("k", head)
    assert decoded is not None
    assert decoded.state == S.TASK_STATE_COMPLETED
    for state in (b"-5", b"42", b"2147483647"):  # protobuf keeps unknown enum numbers
        decoded = decode_head("k", [*head[:4], state, *head[5:]])
        assert decoded is not None
        assert decoded.state == int(state)
    for state in (None, b"", b" 3", b"+3", b"0_3", b"\xd9\xa3", b"2147483648", b"9" * 5000):
        with pytest.raises(CorruptDataError, match="state") as info:
            decode_head("k", [*head[:4], state, *head[5:]])
        assert info.value.key == "k"


# -- round trips ---------------------------------------------------------------------------------
async def test_a_refusal_costs_what_a_version_conflict_costs(
    store: VersionedRedisTaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WATCH + HMGET, then UNWATCH: the check adds no round trip to any write."""
    trips: list[int] = []
    real = WatchedTransaction._roundtrip

    async def counted(self: WatchedTransaction, *args: Any, **kw: Any) -> list[Any]:
        trips.append(1)
        return await real(self, *args, **kw)

    monkeypatch.setattr(WatchedTransaction, "_roundtrip", counted)

    async def count(call: Callable[[], Any]) -> int:
        trips.clear()
        with contextlib.suppress(ConcurrentTaskModificationError):
            await call()
        return len(trips)

    v = await _seed(store, "t", S.TASK_STATE_COMPLETED)
    working = make_task("t", state=S.TASK_STATE_WORKING)
    done = make_task("t", state=S.TASK_STATE_COMPLETED)
    refused = await count(lambda: store.save(working, prev_version=v, context=ctx()))
    conflict = await count(lambda: store.save(done, prev_version=TaskVersion(1), context=ctx()))
    accepted = await count(lambda: store.save(done, prev_version=v, context=ctx()))
    assert (refused, conflict, accepted) == (2, 2, 2)


# -- the documented difference from the SDK ------------------------------------------------------
@pytest.mark.parametrize("state", [pytest.param(s, id=TaskState.Name(s)[11:]) for s in TERMINAL])
async def test_the_sdk_in_memory_store_does_not_enforce_it(
    store: VersionedRedisTaskStore, state: int
) -> None:
    """The SDK's ``InMemoryTaskStore`` restarts a terminal task; ours refuses, on purpose."""
    oracle = InMemoryTaskStore()
    ours = store.as_task_store
    for s in (oracle, ours):
        await s.save(make_task("t", state=state), ctx())
    restart = make_task("t", state=S.TASK_STATE_WORKING)
    await oracle.save(restart, ctx())
    assert await oracle.get("t", ctx()) == restart  # the SDK: restarted
    with pytest.raises(TerminalStateError):
        await ours.save(restart, ctx())
    assert await ours.get("t", ctx()) == make_task("t", state=state)  # ours: still terminal


# -- races on real servers -----------------------------------------------------------------------
N = 24
MIX = [S.TASK_STATE_COMPLETED, S.TASK_STATE_CANCELED, S.TASK_STATE_WORKING] * (N // 3)


@pytest.fixture
async def stores(
    real_redis: aioredis.Redis, real_url: str, prefix: str
) -> AsyncIterator[list[VersionedRedisTaskStore]]:
    """N stores, each with its own client (as replicas); enough attempts to never give up."""
    clients = [connect(real_url) for _ in range(N)]
    yield [VersionedRedisTaskStore(c, prefix=prefix, max_attempts=10 * N) for c in clients]
    for c in clients:
        await c.aclose()


def _check_terminal_outcome(
    accepted: dict[int, int], refused: list[TerminalStateError], final: int
) -> None:
    """One terminal state: once written, every later accepted write kept it; refusals saw it."""
    assert final in TERMINAL_STATES
    states = [accepted[v] for v in sorted(accepted)]
    first = next(i for i, s in enumerate(states) if s in TERMINAL_STATES)
    assert set(states[first:]) == {final}
    for e in refused:
        assert e.stored_state == final
        assert e.refused_state != final


async def _check_log(
    redis: aioredis.Redis, store: VersionedRedisTaskStore, accepted: dict[int, int],
    writers: dict[int, int],
) -> None:  # fmt: skip
    """The stream holds the seed (version 1) and exactly the accepted writes, in order."""
    key = store.keys.events("t")
    log = [decode_event(key, f) for _, f in await redis.xrange(key)]
    assert [v for v, _ in log] == [1, *sorted(accepted)]
    for version, event in log[1:]:
        assert isinstance(event, TaskStatusUpdateEvent)
        assert event.status.state == accepted[version]
        assert event.metadata["writer"] == str(writers[version])


async def test_racing_writers_from_one_snapshot(stores, real_redis):
    """All writers hold version 1: one update may land, cancels land until a terminal write."""
    await stores[0].save(make_task("t"), event=make_task("t"), prev_version=MISSING, context=ctx())

    async def write(i: int) -> TaskVersion:
        task = make_task("t", state=MIX[i])
        event = status_event("t", MIX[i], writer=str(i))
        return await stores[i].save(task, event=event, prev_version=TaskVersion(1), context=ctx())

    results = await asyncio.gather(*(write(i) for i in range(N)), return_exceptions=True)
    accepted = {version_int(r): MIX[i] for i, r in enumerate(results) if isinstance(r, TaskVersion)}
    writers = {version_int(r): i for i, r in enumerate(results) if isinstance(r, TaskVersion)}
    losers = [r for r in results if not isinstance(r, TaskVersion)]
    assert all(isinstance(r, ConcurrentTaskModificationError) for r in losers), losers
    assert len(accepted) + len(losers) == N
    assert sorted(accepted) == list(range(2, 2 + len(accepted)))  # distinct, consecutive
    stored = await stores[0].get("t", ctx())
    assert stored is not None
    assert stored.version == TaskVersion(1 + len(accepted))
    refused = [r for r in losers if isinstance(r, TerminalStateError)]
    _check_terminal_outcome(accepted, refused, stored.task.status.state)
    await _check_log(real_redis, stores[0], accepted, writers)


async def test_racing_writers_that_reread(stores, real_redis):
    """Writers re-read after a conflict: the first terminal state wins, later ones are refused.

    A writer stops when accepted, when refused with ``TerminalStateError``, or when a cancel
    finds the task already terminal (the SDK's conflict, as its handler sees it).
    """
    await stores[0].save(make_task("t"), event=make_task("t"), prev_version=MISSING, context=ctx())
    accepted: dict[int, int] = {}
    writers: dict[int, int] = {}
    losers: list[ConcurrentTaskModificationError] = []

    async def write(i: int) -> None:
        store = stores[i]
        for _ in range(10 * N):
            stored = await store.get("t", ctx())
            assert stored is not None
            task = make_task("t", state=MIX[i])
            event = status_event("t", MIX[i], writer=str(i))
            try:
                version = await store.save(
                    task, event=event, prev_version=stored.version, context=ctx()
                )
            except TerminalStateError as e:
                losers.append(e)
                return
            except ConcurrentTaskModificationError as e:
                now = await store.get("t", ctx())
                if MIX[i] == S.TASK_STATE_CANCELED and now and now.task.status.state in TERMINAL:
                    losers.append(e)
                    return
                continue
            accepted[version_int(version)] = MIX[i]
            writers[version_int(version)] = i
            return
        raise AssertionError(f"writer {i} never finished")

    await asyncio.gather(*(write(i) for i in range(N)))
    assert len(accepted) + len(losers) == N
    assert sorted(accepted) == list(range(2, 2 + len(accepted)))
    stored = await stores[0].get("t", ctx())
    assert stored is not None
    assert stored.version == TaskVersion(1 + len(accepted))
    refused = [r for r in losers if isinstance(r, TerminalStateError)]
    _check_terminal_outcome(accepted, refused, stored.task.status.state)
    final = stored.task.status.state
    # Every writer of the final state got in (a same-state rewrite is allowed), but for
    # cancels after the first (the SDK's rule: a cancel of a terminal task conflicts).
    got = sorted(i for v, i in writers.items() if accepted[v] == final)
    if final == S.TASK_STATE_CANCELED:
        assert len(got) == 1
    else:
        assert got == [i for i in range(N) if MIX[i] == final]
    other = S.TASK_STATE_CANCELED if final == S.TASK_STATE_COMPLETED else S.TASK_STATE_COMPLETED
    assert other not in accepted.values()
    await _check_log(real_redis, stores[0], accepted, writers)


async def test_racing_plain_writers(stores, real_redis):
    """Unversioned upserts: each accepted write adds one version; the first terminal sticks."""
    plain: list[RedisTaskStore] = [s.as_task_store for s in stores]
    await plain[0].save(make_task("t"), ctx())

    async def write(i: int) -> None:
        await plain[i].save(make_task("t", state=MIX[i]), ctx())

    results = await asyncio.gather(*(write(i) for i in range(N)), return_exceptions=True)
    stored = await stores[0].get("t", ctx())
    assert stored is not None
    final = stored.task.status.state
    assert final in TERMINAL_STATES
    accepted = [i for i, r in enumerate(results) if r is None]
    assert stored.version == TaskVersion(1 + len(accepted))
    for i, r in enumerate(results):
        if MIX[i] == final:
            assert r is None  # every writer of the final state got in (same state: allowed)
        elif MIX[i] in TERMINAL_STATES:
            assert isinstance(r, TerminalStateError)  # another terminal state: never
        else:
            assert r is None or isinstance(r, TerminalStateError)  # in before the end, or not
        if r is not None:
            assert isinstance(r, TerminalStateError)
            assert (r.stored_state, r.refused_state) == (final, MIX[i])
            assert r.key == stores[0].keys.task("t")
    assert await real_redis.xlen(stores[0].keys.events("t")) == 0  # plain saves carry no event
