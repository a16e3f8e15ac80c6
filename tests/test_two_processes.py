"""Two real replica processes (uvicorn, the SDK's routes) on loopback, one Redis, official client.

The replicas are ``examples/agent_server.py``; the driver is ``a2a.client``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from a2a.client import Client, create_client
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    TaskState,
)
from a2a.utils.errors import A2AError

from tests.helpers import ReplicaProcess

ROOT = Path(__file__).resolve().parents[1]
GUARD = 30  # seconds: a hang guard only


@pytest.fixture
def replicas(
    real_url: str, real_redis: object, prefix: str
) -> Iterator[tuple[ReplicaProcess, ReplicaProcess]]:
    pair = (
        ReplicaProcess("A", real_url, prefix, 0.15),
        ReplicaProcess("B", real_url, prefix, 0.15),
    )
    try:
        for r in pair:
            r.wait_ready()
        yield pair
    finally:
        for r in pair:
            r.stop()


@pytest.fixture
async def clients(
    replicas: tuple[ReplicaProcess, ReplicaProcess],
) -> AsyncIterator[tuple[Client, Client]]:
    a, b = replicas
    ca, cb = await create_client(a.url), await create_client(b.url)
    yield ca, cb
    await ca.close()
    await cb.close()


def _send(text: str) -> SendMessageRequest:
    return SendMessageRequest(
        message=Message(role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[Part(text=text)])
    )


def _chunks(responses: list[StreamResponse]) -> list[str]:
    out = []
    for r in responses:
        if r.HasField("task"):
            out += [p.text for a in r.task.artifacts for p in a.parts]
        elif r.HasField("artifact_update"):
            out += [p.text for p in r.artifact_update.artifact.parts]
    return out


def _final_state(responses: list[StreamResponse]) -> int:
    for r in reversed(responses):
        if r.HasField("status_update"):
            return r.status_update.status.state
        if r.HasField("task"):
            return r.task.status.state
    raise AssertionError("no state in the stream")


async def _start(client: Client, text: str) -> tuple[str, list[StreamResponse], asyncio.Task]:
    """Start a streaming send; return its task id once A has streamed its first chunk."""
    seen: list[StreamResponse] = []
    first_chunk = asyncio.get_running_loop().create_future()

    async def drain() -> None:
        async for response in client.send_message(_send(text)):
            seen.append(response)
            if response.HasField("artifact_update") and not first_chunk.done():
                first_chunk.set_result(response.artifact_update.task_id)

    runner = asyncio.create_task(drain())
    task_id = await asyncio.wait_for(first_chunk, GUARD)
    return task_id, seen, runner


async def test_resubscribe_on_b_mid_stream_gets_every_later_event(clients):
    a, b = clients
    task_id, seen_a, runner = await _start(a, "chunks=12")
    seen_b = [r async for r in b.subscribe(SubscribeToTaskRequest(id=task_id))]
    await asyncio.wait_for(runner, GUARD)
    expected = [f"chunk {i} from A" for i in range(12)]
    assert _chunks(seen_a) == expected
    assert seen_b[0].HasField("task")  # the snapshot first
    assert _chunks(seen_b) == expected  # snapshot + live: no gap, no duplicate, in order
    assert _final_state(seen_b) == TaskState.TASK_STATE_COMPLETED


async def test_cancel_from_b_stops_the_agent_on_a(clients):
    a, b = clients
    task_id, seen_a, runner = await _start(a, "chunks=200")
    cancelled = await b.cancel_task(CancelTaskRequest(id=task_id))
    assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
    await asyncio.wait_for(runner, GUARD)  # A's stream ends
    assert _final_state(seen_a) == TaskState.TASK_STATE_CANCELED
    assert len(_chunks(seen_a)) < 200
    for client in (a, b):
        task = await client.get_task(GetTaskRequest(id=task_id))
        assert task.status.state == TaskState.TASK_STATE_CANCELED


async def test_get_and_list_agree_across_replicas(clients):
    a, b = clients
    ids = []
    for client in (a, b, a):
        async for r in client.send_message(_send("chunks=1")):
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
    first = [r async for r in a.send_message(_send("input please"))]
    assert _final_state(first) == TaskState.TASK_STATE_INPUT_REQUIRED
    task = next(r.task for r in first if r.HasField("task"))
    task_id = task.id
    follow_up = _send("answer chunks=2")
    follow_up.message.task_id = task_id
    follow_up.message.context_id = task.context_id
    second = [r async for r in b.send_message(follow_up)]
    assert _final_state(second) == TaskState.TASK_STATE_COMPLETED
    assert _chunks(second)[-2:] == ["chunk 0 from B", "chunk 1 from B"]
    task = await a.get_task(GetTaskRequest(id=task_id))
    assert task.status.state == TaskState.TASK_STATE_COMPLETED


async def test_failure_on_a_shows_as_failed_on_b(clients):
    a, b = clients
    seen: list[StreamResponse] = []
    with pytest.raises(A2AError, match="asked to fail"):  # A's stream reports the error
        async for response in a.send_message(_send("please fail")):
            seen.append(response)
    task_id = next(r.task.id for r in seen if r.HasField("task"))
    task = await b.get_task(GetTaskRequest(id=task_id))
    assert task.status.state == TaskState.TASK_STATE_FAILED


async def test_fifty_concurrent_tasks_each_followed_on_the_other_replica(clients):
    a, b = clients

    async def one(origin: Client, other: Client) -> None:
        # 12 chunks 0.15 s apart: the subscription lands long before the task ends, even on
        # a loaded machine (the SDK refuses to subscribe to a finished task).
        task_id, seen, runner = await _start(origin, "chunks=12")
        followed = [r async for r in other.subscribe(SubscribeToTaskRequest(id=task_id))]
        await asyncio.wait_for(runner, GUARD)
        expected = _chunks(seen)
        assert len(expected) == 12
        assert _chunks(followed) == expected  # snapshot + live: complete, in order, once
        assert _final_state(followed) == TaskState.TASK_STATE_COMPLETED

    pairs = [(a, b) if i % 2 else (b, a) for i in range(50)]
    await asyncio.wait_for(asyncio.gather(*(one(o, t) for o, t in pairs)), 120)
