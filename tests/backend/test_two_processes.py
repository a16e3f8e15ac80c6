"""Two real replica processes (uvicorn, the SDK's routes) on loopback, one Redis, official client.

The replicas are ``examples/agent_server.py``; the driver is ``a2a.client``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from a2a.client import Client
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    TaskState,
)
from a2a.utils.errors import A2AError

from tests.helpers import (
    ReplicaProcess,
    chunks,
    final_state,
    replica_pair,
    send_request,
    start_stream,
)

GUARD = 30  # seconds: a hang guard only


@pytest.fixture
def replicas(
    real_url: str, real_redis: object, prefix: str
) -> Iterator[tuple[ReplicaProcess, ReplicaProcess]]:
    with replica_pair(real_url, prefix, 0.15) as pair:
        yield pair


async def test_resubscribe_on_b_mid_stream_gets_every_later_event(replicas, clients):
    a, b = clients
    task_id, seen_a, runner = await start_stream(a, "chunks=12")
    subscription = b.subscribe(SubscribeToTaskRequest(id=task_id))
    # A stands still until B has taken the subscription (its first response, the stored
    # task): the task cannot end first, however slowly B answers on a loaded machine.
    with replicas[0].paused():
        seen_b = [await asyncio.wait_for(anext(subscription), GUARD)]
    seen_b += [r async for r in subscription]
    await asyncio.wait_for(runner, GUARD)
    expected = [f"chunk {i} from A" for i in range(12)]
    assert chunks(seen_a) == expected
    assert seen_b[0].HasField("task")  # the snapshot first
    assert chunks(seen_b) == expected  # snapshot + live: no gap, no duplicate, in order
    assert final_state(seen_b) == TaskState.TASK_STATE_COMPLETED


async def test_cancel_from_b_stops_the_agent_on_a(clients):
    a, b = clients
    task_id, seen_a, runner = await start_stream(a, "chunks=200")
    cancelled = await b.cancel_task(CancelTaskRequest(id=task_id))
    assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
    await asyncio.wait_for(runner, GUARD)  # A's stream ends
    assert final_state(seen_a) == TaskState.TASK_STATE_CANCELED
    assert len(chunks(seen_a)) < 200
    for client in (a, b):
        task = await client.get_task(GetTaskRequest(id=task_id))
        assert task.status.state == TaskState.TASK_STATE_CANCELED


async def test_get_and_list_agree_across_replicas(clients):
    a, b = clients
    ids = []
    for client in (a, b, a):
        async for r in client.send_message(send_request("chunks=1")):
            if r.HasField("task"):
                ids.append(r.task.id)
    page_a = await a.list_tasks(ListTasksRequest())
    page_b = await b.list_tasks(ListTasksRequest())
    assert sorted(t.id for t in page_b.tasks) == sorted(ids)
    assert [t.id for t in page_a.tasks] == [t.id for t in page_b.tasks]
    assert page_b.total_size == 3
    for task_id in ids:
        ta = await a.get_task(GetTaskRequest(id=task_id))
        tb = await b.get_task(GetTaskRequest(id=task_id))
        assert ta == tb
        assert tb.status.state == TaskState.TASK_STATE_COMPLETED


async def test_input_required_follow_up_on_b_completes_the_task(clients):
    a, b = clients
    first = [r async for r in a.send_message(send_request("input please"))]
    assert final_state(first) == TaskState.TASK_STATE_INPUT_REQUIRED
    task = next(r.task for r in first if r.HasField("task"))
    task_id = task.id
    follow_up = send_request("answer chunks=2")
    follow_up.message.task_id = task_id
    follow_up.message.context_id = task.context_id
    second = [r async for r in b.send_message(follow_up)]
    assert final_state(second) == TaskState.TASK_STATE_COMPLETED
    assert chunks(second)[-2:] == ["chunk 0 from B", "chunk 1 from B"]
    task = await a.get_task(GetTaskRequest(id=task_id))
    assert task.status.state == TaskState.TASK_STATE_COMPLETED


async def test_failure_on_a_shows_as_failed_on_b(clients):
    a, b = clients
    seen: list[StreamResponse] = []
    with pytest.raises(A2AError, match="asked to fail"):  # A's stream reports the error
        async for response in a.send_message(send_request("please fail")):
            seen.append(response)
    task_id = next(r.task.id for r in seen if r.HasField("task"))
    task = await b.get_task(GetTaskRequest(id=task_id))
    assert task.status.state == TaskState.TASK_STATE_FAILED


async def test_fifty_concurrent_tasks_each_followed_on_the_other_replica(clients):
    a, b = clients

    async def one(origin: Client, other: Client) -> None:
        # 40 chunks 0.15 s apart: the subscription must land before the task ends (the SDK
        # refuses to subscribe to a finished task), and it has about six seconds to, with
        # the other 49 going on (pausing an origin here would pause 24 more tasks).
        task_id, seen, runner = await start_stream(origin, "chunks=40")
        followed = [r async for r in other.subscribe(SubscribeToTaskRequest(id=task_id))]
        await asyncio.wait_for(runner, GUARD)
        expected = chunks(seen)
        assert len(expected) == 40
        assert chunks(followed) == expected  # snapshot + live: complete, in order, once
        assert final_state(followed) == TaskState.TASK_STATE_COMPLETED

    pairs = [(a, b) if i % 2 else (b, a) for i in range(50)]
    await asyncio.wait_for(asyncio.gather(*(one(o, t) for o, t in pairs)), 120)
