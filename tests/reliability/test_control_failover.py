"""The control plane across a Sentinel failover: after the primary is SIGKILLed and its
replica promoted, a cancel sent to B still reaches the agent running on A, and a replica
that dies afterwards still has its running task ended FAILED by the survivor.

Two replicas in this process (two ``RedisBackend.from_url("redis+sentinel://...")``, each
with the V2 handler and an agent that stays silent until cancelled). The promoted primary
holds nothing of the control plane's subscriptions: each replica's pub/sub link reconnects
through the Sentinels and subscribes its control channel again.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from a2a.helpers.proto_helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import EventQueue
from a2a.server.tasks.task_updater import TaskUpdater
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    TaskState,
)

from a2a_redis import A2ARedisError, RedisBackend
from a2a_redis.events.orphans import LOST_REPLICA_TEXT
from tests.deployments import SentinelDeployment
from tests.helpers import agent_card

S = TaskState
GUARD = 60.0  # seconds: a hang guard only
CONTEXT = ServerCallContext()


class SilentAgent(AgentExecutor):
    """WORKING, then nothing until cancelled; its cancel reports CANCELED naming its replica."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        if context.current_task is None:
            await event_queue.enqueue_event(new_task_from_user_message(context.message))
        await updater.start_work()
        await asyncio.sleep(3600)

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        await updater.cancel(updater.new_agent_message([Part(text=f"{self.name}: cancelled")]))


async def start(handler: Any) -> tuple[str, asyncio.Task[None], list[Any]]:
    """A streaming send on ``handler``; the task id once WORKING, the drain, its events."""
    seen: list[Any] = []
    working: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    request = SendMessageRequest(
        message=Message(role=Role.ROLE_USER, message_id=uuid.uuid4().hex, parts=[Part(text="go")])
    )

    async def drain() -> None:
        async for event in handler.on_message_send_stream(request, CONTEXT):
            seen.append(event)
            status = getattr(event, "status", None)
            if status is not None and status.state == S.TASK_STATE_WORKING and not working.done():
                working.set_result(event.task_id)

    runner = asyncio.create_task(drain())
    return await asyncio.wait_for(working, GUARD), runner, seen


async def until_redis_answers(call: Any) -> Any:
    """``call()`` again while the failover lasts (typed outage errors), within the guard."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GUARD
    while True:
        try:
            return await call()
        except A2ARedisError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def pair(url: str, prefix: str) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    made = [
        RedisBackend.from_url(
            url, prefix=prefix, lease_ttl=1.0, cancel_timeout=5.0, socket_timeout=5,
            socket_connect_timeout=1,
        )
        for _ in range(2)
    ]  # fmt: skip
    try:
        yield made[0], made[1]
    finally:
        for backend in made:
            await backend.aclose()


async def test_forwarded_cancel_and_orphan_reaping_work_after_a_failover(prefix: str):
    with SentinelDeployment(down_after_ms=1000, failover_timeout_ms=3000) as deployment:
        async with pair(deployment.url, prefix) as (a, b):
            ha = a.request_handler(SilentAgent("A"), agent_card())
            hb = b.request_handler(SilentAgent("B"), agent_card())
            await hb.on_list_tasks(ListTasksRequest(), CONTEXT)  # B's control plane starts
            await b.control.ready()
            task_id, runner, seen = await start(ha)
            await a.control.ready()

            old_port = await deployment.master_port()
            reconnects = a.listener.reconnects, b.listener.reconnects
            deployment.primary.kill()
            assert deployment.replica is not None
            assert await deployment.wait_failover(old_port, GUARD) == deployment.replica.port

            # Both replicas' pub/sub links reconnect to the new master (through the
            # Sentinels) and subscribe their control channels again; a request sent before
            # that would be lost, and the sender would record CANCELED itself after
            # cancel_timeout (A's agent then stops at its next renewal).
            for _ in range(int(GUARD * 10)):
                again = (
                    a.listener.reconnects > reconnects[0] and b.listener.reconnects > reconnects[1]
                )
                if again and a.listener.connected and b.listener.connected:
                    break
                await asyncio.sleep(0.1)
            assert a.listener.connected and b.listener.connected

            # 1. A cancel on B reaches the agent on A through the new master's pub/sub.
            async def cancel() -> Any:
                return await hb.on_cancel_task(CancelTaskRequest(id=task_id), CONTEXT)

            cancelled = await until_redis_answers(cancel)
            assert cancelled.status.state == S.TASK_STATE_CANCELED
            assert cancelled.status.message.parts[0].text == "A: cancelled"  # ran on A
            await asyncio.wait_for(runner, GUARD)
            assert seen[-1].status.state == S.TASK_STATE_CANCELED
            assert b.control.stats()["cancels_answered"] == 1

            # 2. A runs another task, then dies: B ends it FAILED on the new master.
            task_id, runner, _ = await until_redis_answers(lambda: start(ha))
            renewer = a.leases._renewer
            assert renewer is not None
            a.leases._closed = True  # A stops renewing and releases nothing
            renewer.cancel()
            a.leases._held.clear()

            async def failed() -> bool:
                task = await hb.on_get_task(GetTaskRequest(id=task_id), CONTEXT)
                return task is not None and task.status.state == S.TASK_STATE_FAILED

            for _ in range(int(GUARD * 10)):
                if await until_redis_answers(failed):
                    break
                await asyncio.sleep(0.1)
            task = await hb.on_get_task(GetTaskRequest(id=task_id), CONTEXT)
            assert task is not None and task.status.state == S.TASK_STATE_FAILED
            assert task.status.message.parts[0].text == LOST_REPLICA_TEXT
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
