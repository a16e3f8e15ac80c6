"""Race tests of the task store: concurrent writers with asyncio.gather, on real servers.

Each writer has its own client (its own connections), as replicas would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from a2a.server.cluster import ConcurrentTaskModificationError, TaskVersion
from a2a.types.a2a_pb2 import TaskState, TaskStatusUpdateEvent

from a2a_redis.errors import TaskOwnedElsewhereError
from a2a_redis.log.codec import decode_event
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from tests.helpers import connect, ctx, make_task

S = TaskState
MISSING = TaskVersion.MISSING
N = 24


@pytest.fixture
async def stores(
    real_redis: aioredis.Redis, real_url: str, prefix: str
) -> AsyncIterator[list[VersionedRedisTaskStore]]:
    clients = [connect(real_url) for _ in range(N)]
    yield [VersionedRedisTaskStore(c, prefix=prefix) for c in clients]
    for c in clients:
        await c.aclose()


async def _outcomes(coros):
    import asyncio

    return await asyncio.gather(*coros, return_exceptions=True)


async def test_concurrent_first_writes_exactly_one_wins(stores, real_redis):
    results = await _outcomes(
        s.save(make_task("t", context_id=f"c{i}"), event=make_task("t", context_id=f"c{i}"),
               prev_version=MISSING, context=ctx())
        for i, s in enumerate(stores)
    )  # fmt: skip
    wins = [r for r in results if isinstance(r, TaskVersion)]
    losses = [r for r in results if isinstance(r, ConcurrentTaskModificationError)]
    assert wins == [TaskVersion(1)]
    assert len(losses) == N - 1
    winner = results.index(wins[0])
    stored = await stores[0].get("t", ctx())
    assert stored is not None
    assert stored.task.context_id == f"c{winner}"
    key = stores[0].keys.events("t")
    assert await real_redis.xlen(key) == 1  # losers appended nothing


async def test_concurrent_cas_writers_lose_nothing(stores, real_redis):
    """N writers each keep retrying CAS until accepted: N consecutive versions, log == writes."""
    base = await stores[0].save(make_task("t"), prev_version=MISSING, context=ctx())
    accepted: dict[int, str] = {}

    async def writer(i: int, store: VersionedRedisTaskStore) -> None:
        for _ in range(10 * N):
            stored = await store.get("t", ctx())
            assert stored is not None
            task = stored.task
            task.metadata["writer"] = str(i)
            event = TaskStatusUpdateEvent(task_id="t", context_id="ctx", metadata=task.metadata)
            event.status.state = S.TASK_STATE_WORKING
            try:
                version = await store.save(
                    task, event=event, prev_version=stored.version, context=ctx()
                )
            except ConcurrentTaskModificationError:
                continue
            accepted[int(repr(version)[12:-1])] = str(i)
            return
        raise AssertionError(f"writer {i} never got a write in")

    await _outcomes([writer(i, s) for i, s in enumerate(stores)])
    assert sorted(accepted) == list(range(2, N + 2))  # distinct, consecutive, after base=1
    assert base == TaskVersion(1)
    key = stores[0].keys.events("t")
    log = [decode_event(key, f) for _, f in await real_redis.xrange(key)]
    assert [v for v, _ in log] == sorted(accepted)
    assert [e.metadata["writer"] for _, e in log] == [accepted[v] for v in sorted(accepted)]
    stored = await stores[0].get("t", ctx())
    assert stored is not None
    assert stored.version == TaskVersion(N + 1)


async def test_concurrent_cancel_against_updates(stores):
    """A cancel racing updates always lands (task non-terminal); updates after it conflict."""
    v1 = await stores[0].save(make_task("t"), prev_version=MISSING, context=ctx())
    half = N // 2

    async def update(store: VersionedRedisTaskStore) -> TaskVersion:
        return await store.save(
            make_task("t", state=S.TASK_STATE_WORKING), prev_version=v1, context=ctx()
        )

    async def cancel(store: VersionedRedisTaskStore) -> TaskVersion:
        return await store.save(
            make_task("t", state=S.TASK_STATE_CANCELED), prev_version=v1, context=ctx()
        )

    results = await _outcomes(
        [update(s) for s in stores[:half]] + [cancel(s) for s in stores[half:]]
    )
    updates, cancels = results[:half], results[half:]
    assert sum(isinstance(r, TaskVersion) for r in updates) <= 1
    cancel_wins = [r for r in cancels if isinstance(r, TaskVersion)]
    assert len(cancel_wins) == 1  # the first cancel lands; the rest see a terminal task
    assert all(isinstance(r, ConcurrentTaskModificationError) for r in results if r not in
               [*cancel_wins, *(u for u in updates if isinstance(u, TaskVersion))])  # fmt: skip
    stored = await stores[0].get("t", ctx())
    assert stored is not None
    assert stored.task.status.state == S.TASK_STATE_CANCELED
    assert stored.version == cancel_wins[0]


async def test_two_owners_racing_for_one_task_id(stores):
    owners = ["alice", "bob"] * (N // 2)
    results = await _outcomes(
        s.save(make_task("t"), prev_version=MISSING, context=ctx(o))
        for s, o in zip(stores, owners, strict=True)
    )
    winners = [o for o, r in zip(owners, results, strict=True) if isinstance(r, TaskVersion)]
    assert len(winners) == 1
    loser = "bob" if winners[0] == "alice" else "alice"
    assert await stores[0].get("t", ctx(loser)) is None
    assert await stores[0].get("t", ctx(winners[0])) is not None
    plain = stores[1].as_task_store
    with pytest.raises(TaskOwnedElsewhereError):
        await plain.save(make_task("t"), ctx(loser))
