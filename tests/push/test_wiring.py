"""``RedisBackend.request_handler`` wires the push sender when the card declares push.

The SDK's V2 handler, in process, on two replicas sharing one server; the message carries
a push config for the real loopback receiver (``tests/push/receiver.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from a2a.types.a2a_pb2 import TaskPushNotificationConfig, TaskState
from a2a.utils.errors import InvalidParamsError

from a2a_redis import RedisBackend
from a2a_redis.push import RedisPushNotificationSender
from tests.helpers import (
    ScriptedAgent,
    agent_card,
    backend_pair,
    ctx,
    eventually,
    push_card,
    push_config,
    send_request,
)
from tests.push.receiver import Receiver, running_receiver
from tests.push.test_delivery import CREDENTIALS, FAST, TOKEN


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as r:
        yield r


@pytest.fixture
async def replicas(real_url: str, prefix: str) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    options = {"allow_hosts": ["127.0.0.1"], "claim_after": 1.0, "retry": FAST}
    async with backend_pair(real_url, prefix, push_options=options) as pair:
        yield pair


async def test_a_handler_with_a_push_card_delivers_every_event(replicas, receiver) -> None:
    a, b = replicas
    agent = ScriptedAgent()
    handler_a = a.request_handler(agent, push_card())
    b.request_handler(agent, push_card())  # replica B's workers share the deliveries
    assert isinstance(a.push_sender, RedisPushNotificationSender)
    config = push_config("", "x", TOKEN, CREDENTIALS, url=receiver.url("x"))
    result = await asyncio.wait_for(
        handler_a.on_message_send(send_request("complete", config), ctx()), 60
    )
    task_id = result.id
    await eventually(
        lambda: any(
            h.event().status_update.status.state == TaskState.TASK_STATE_COMPLETED
            for h in receiver.delivered("x")
        ),
        what="the COMPLETED notification",
    )
    hits = receiver.delivered("x")
    assert len({h.nid for h in hits}) == len(hits)
    kinds = [h.event().WhichOneof("payload") for h in hits]
    assert kinds[0] == "task" and kinds[-1] == "status_update"
    assert "artifact_update" in kinds
    assert all(
        (h.event().task.id or h.event().status_update.task_id or h.event().artifact_update.task_id)
        == task_id
        for h in hits
    )
    health = await a.health()
    assert health["push"]["running"] and health["push"]["delivered"] >= 0


async def test_a_card_without_push_gets_no_sender(replicas) -> None:
    a, _ = replicas
    a.request_handler(ScriptedAgent(), agent_card())
    assert a.push_sender is None
    assert (await a.health())["push"] is None


async def test_handler_refuses_unsafe_urls_and_the_101st_config(replicas, receiver) -> None:
    a, _ = replicas
    handler = a.request_handler(ScriptedAgent(), push_card())
    task = await asyncio.wait_for(handler.on_message_send(send_request("input"), ctx()), 60)
    unsafe = TaskPushNotificationConfig(
        task_id=task.id, id="m", url="http://169.254.169.254/latest/meta-data"
    )
    with pytest.raises(InvalidParamsError):
        await handler.on_create_task_push_notification_config(unsafe, ctx())
    a.push_config_store.set_max_configs(3)
    for i in range(3):
        config = TaskPushNotificationConfig(task_id=task.id, id=f"c{i}", url=receiver.url("x"))
        await handler.on_create_task_push_notification_config(config, ctx())
    one_more = TaskPushNotificationConfig(task_id=task.id, id="c3", url=receiver.url("x"))
    with pytest.raises(InvalidParamsError):
        await handler.on_create_task_push_notification_config(one_more, ctx())


async def test_the_legacy_handler_is_not_given_the_sender(replicas) -> None:
    a, _ = replicas
    a.request_handler(ScriptedAgent(), push_card(), legacy=True)
    assert a.push_sender is None
