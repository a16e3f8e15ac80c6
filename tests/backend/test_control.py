"""Cross-replica control on two real replica processes (uvicorn, the SDK's routes, the
official client), for both handlers: a cancel sent to either replica stops the agent where
it runs, and holds; a replica frozen past its lease finds its task ended and its agent
stopped when it wakes.

The replicas are ``examples/agent_server.py``: its agent's ``cancel`` reports CANCELED with
a message naming its replica ("A: cancelled"), which shows where the cancel ran.
Timeouts are hang guards only, never asserted bounds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from a2a.client import Client, ClientCallContext
from a2a.types import CancelTaskRequest, GetTaskRequest, StreamResponse, TaskState
from a2a.utils.errors import A2AError

from a2a_redis.events.orphans import LOST_REPLICA_TEXT
from tests.helpers import (
    ReplicaProcess,
    chunks,
    client_pair,
    final_state,
    replica_pair,
    send_request,
    subscribe_live,
)

S = TaskState
GUARD = 40.0  # seconds: a hang guard only
QUIET = ClientCallContext(timeout=GUARD)  # a silent agent sends nothing for a while
KINDS = ["v2", "legacy"]


def handler_args(kind: str) -> tuple[str, ...]:
    return ("--legacy",) if kind == "legacy" else ()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def start(client: Client, text: str) -> tuple[str, list[StreamResponse], asyncio.Task[None]]:
    """Send ``text`` streaming; return once the task runs (a WORKING status came)."""
    seen: list[StreamResponse] = []
    working: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def drain() -> None:
        async for response in client.send_message(send_request(text), context=QUIET):
            seen.append(response)
            update = response.status_update
            if update.status.state == S.TASK_STATE_WORKING and not working.done():
                working.set_result(update.task_id)

    runner = asyncio.create_task(drain())
    done, _ = await asyncio.wait({working, runner}, timeout=GUARD, return_when="FIRST_COMPLETED")
    if working not in done:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        raise AssertionError(f"the task did not start: {seen}")
    return working.result(), seen, runner


def status_text(response: StreamResponse) -> str:
    return " ".join(p.text for p in response.status_update.status.message.parts)


# --- a silent agent, cancelled from the other replica -----------------------------------


@pytest.fixture
def silent_pair(
    real_url: str, prefix: str, kind: str
) -> Iterator[tuple[ReplicaProcess, ReplicaProcess]]:
    with replica_pair(real_url, prefix, 0.01, *handler_args(kind)) as pair:
        yield pair


@pytest.fixture
async def clients(silent_pair) -> AsyncIterator[tuple[Client, Client]]:
    async with client_pair(*silent_pair) as pair:
        yield pair


async def test_a_cancel_on_b_stops_a_silent_agent_on_a(clients):
    a, b = clients
    task_id, seen_a, runner_a = await start(a, "silent=60 chunks=3")  # no word for 60 s
    cancelled = await b.cancel_task(CancelTaskRequest(id=task_id))
    assert cancelled.status.state == S.TASK_STATE_CANCELED
    assert "A: cancelled" in " ".join(p.text for p in cancelled.status.message.parts)  # ran on A
    await asyncio.wait_for(runner_a, GUARD)  # A's own stream ends...
    assert final_state(seen_a) == S.TASK_STATE_CANCELED  # ... with the CANCELED event
    assert status_text(seen_a[-1]) == "A: cancelled"
    for client in (a, b):
        assert (await client.get_task(GetTaskRequest(id=task_id))).status.state == (
            S.TASK_STATE_CANCELED
        )


async def test_two_cancels_at_once_from_both_replicas_agree(clients):
    a, b = clients
    task_id, seen_a, runner_a = await start(a, "silent=60")
    answers = await asyncio.gather(
        a.cancel_task(CancelTaskRequest(id=task_id)),
        b.cancel_task(CancelTaskRequest(id=task_id)),
        return_exceptions=True,
    )
    states = [x.status.state for x in answers if not isinstance(x, BaseException)]
    assert states and set(states) == {S.TASK_STATE_CANCELED}  # none answers another state
    for x in answers:  # a loser is told the task is not cancelable (it already was)
        assert not isinstance(x, BaseException) or "cancel" in str(x).lower()
    await asyncio.wait_for(runner_a, GUARD)
    assert final_state(seen_a) == S.TASK_STATE_CANCELED
    assert (await b.get_task(GetTaskRequest(id=task_id))).status.state == S.TASK_STATE_CANCELED


# --- cancels during a fast stream: every one holds, no chunk lost -----------------------


@pytest.fixture
def fast_pair(
    real_url: str, prefix: str, kind: str
) -> Iterator[tuple[ReplicaProcess, ReplicaProcess]]:
    with replica_pair(real_url, prefix, 0.002, *handler_args(kind)) as pair:
        yield pair


async def test_ten_cancels_from_b_during_a_fast_stream_all_hold(fast_pair):
    async with client_pair(*fast_pair) as (a, b):
        for _ in range(10):
            task_id, seen_a, runner_a = await start(a, "chunks=1000")
            while not chunks(seen_a):  # some chunks have streamed
                await asyncio.sleep(0.005)
            cancelled = await b.cancel_task(CancelTaskRequest(id=task_id))
            assert cancelled.status.state == S.TASK_STATE_CANCELED
            await asyncio.wait_for(runner_a, GUARD)
            assert final_state(seen_a) == S.TASK_STATE_CANCELED
            received = chunks(seen_a)
            assert len(received) < 1000
            await asyncio.sleep(0.2)  # 100 chunk periods: an agent still running would write
            stored = await b.get_task(GetTaskRequest(id=task_id))
            assert stored.status.state == S.TASK_STATE_CANCELED  # the cancel held
            # Every chunk the sender received before CANCELED is in the stored task.
            assert chunks([StreamResponse(task=stored)]) == received


# --- a replica frozen past its lease ----------------------------------------------------


@pytest.fixture
def frozen_pair(
    real_url: str, prefix: str, kind: str
) -> Iterator[tuple[ReplicaProcess, ReplicaProcess]]:
    with replica_pair(real_url, prefix, 0.2, "--lease-ttl", "1", *handler_args(kind)) as pair:
        yield pair


async def test_a_replica_frozen_past_its_lease_finds_its_task_failed_and_stops(frozen_pair):
    replica_a, _ = frozen_pair
    async with client_pair(*frozen_pair) as (a, b):
        task_id, seen_a, runner_a = await start(a, "chunks=100")
        for _ in range(int(GUARD * 50)):  # mid-stream: a chunk has come
            if chunks(seen_a):
                break
            await asyncio.sleep(0.02)

        async def failed_on_b() -> bool:
            task = await b.get_task(GetTaskRequest(id=task_id))
            return task.status.state == S.TASK_STATE_FAILED

        with replica_a.paused():  # SIGSTOP: A sends nothing, its heartbeat lapses
            for _ in range(int(GUARD * 10)):
                if await failed_on_b():
                    break
                await asyncio.sleep(0.1)
        stored = await b.get_task(GetTaskRequest(id=task_id))
        assert stored.status.state == S.TASK_STATE_FAILED
        assert LOST_REPLICA_TEXT in " ".join(p.text for p in stored.status.message.parts)
        # A wakes up: its next write is refused and its agent stops; the task stays FAILED.
        await asyncio.wait_for(asyncio.gather(runner_a, return_exceptions=True), GUARD)
        await asyncio.sleep(1.0)  # 5 chunk periods: an agent still running would write
        after = await b.get_task(GetTaskRequest(id=task_id))
        assert after.status.state == S.TASK_STATE_FAILED
        assert chunks([StreamResponse(task=after)]) == chunks([StreamResponse(task=stored)])


# --- an agent that raises -----------------------------------------------------------------


@pytest.fixture
def paced_pair(
    real_url: str, prefix: str, kind: str
) -> Iterator[tuple[ReplicaProcess, ReplicaProcess]]:
    with replica_pair(real_url, prefix, 0.3, *handler_args(kind)) as pair:
        yield pair


async def test_an_agent_that_raises_ends_failed_for_the_sender_and_a_resubscriber(
    paced_pair, kind: str
):
    async with client_pair(*paced_pair) as (a, b):
        task_id, seen_a, runner_a = await start(a, "chunks=4 fail-late")
        seen_b, runner_b = await subscribe_live(b, task_id, read_timeout=GUARD, guard=GUARD)
        await asyncio.wait_for(runner_b, GUARD)  # B: the FAILED event, then a clean end
        assert final_state(seen_b) == S.TASK_STATE_FAILED
        assert chunks(seen_b) == [f"chunk {i} from A" for i in range(4)]
        if kind == "legacy":  # the sender too: FAILED, then a clean end
            await asyncio.wait_for(runner_a, GUARD)
            assert final_state(seen_a) == S.TASK_STATE_FAILED
        else:  # the SDK's V2 handler reports the agent's error in the sender's stream
            with pytest.raises(A2AError, match="asked to fail"):
                await asyncio.wait_for(runner_a, GUARD)
        for client in (a, b):
            stored = await client.get_task(GetTaskRequest(id=task_id))
            assert stored.status.state == S.TASK_STATE_FAILED
            assert chunks([StreamResponse(task=stored)]) == [f"chunk {i} from A" for i in range(4)]
