"""``RedisBackend.request_handler`` wires the push sender when the card declares push.

The SDK's V2 handler and the legacy handler (its events delivered by stream position), in
process, on two replicas sharing one server; the message carries
a push config for the real loopback receiver (``tests/push/receiver.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from a2a.server.request_handlers import RequestHandler
from a2a.types.a2a_pb2 import (
    Task,
    TaskArtifactUpdateEvent,
    TaskPushNotificationConfig,
    TaskState,
    TaskStatusUpdateEvent,
)
from a2a.utils.errors import InvalidParamsError
from a2a.utils.proto_utils import to_stream_response
from google.protobuf.json_format import MessageToDict

from a2a_redis import RedisBackend
from a2a_redis.push import RedisPushNotificationSender
from a2a_redis.push.dead import DeadLetter, dead_letters, retry_dead
from tests.helpers import (
    ScriptedAgent,
    agent_card,
    backend_pair,
    ctx,
    eventually,
    make_task,
    numbered,
    push_card,
    push_config,
    send_request,
)
from tests.push.receiver import Hit, Receiver, running_receiver
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


PUSHED = (Task, TaskStatusUpdateEvent, TaskArtifactUpdateEvent)


async def stream_legacy(handler: RequestHandler, config: TaskPushNotificationConfig) -> list[Any]:
    """Stream one ``complete`` run: the events the SDK's consumer saved (and would push)."""

    async def run() -> list[Any]:  # each as it came: the SDK updates a Task in place
        request = send_request("complete", config)
        return [
            MessageToDict(to_stream_response(e))
            async for e in handler.on_message_send_stream(request, ctx())
            if isinstance(e, PUSHED)
        ]

    return await asyncio.wait_for(run(), 60)


async def all_delivered(receiver: Receiver, path: str, n: int) -> list[Hit]:
    await eventually(lambda: len(receiver.delivered(path)) >= n, what=f"{n} deliveries")
    return receiver.delivered(path)


async def test_the_legacy_handler_delivers_every_event_in_order(replicas, receiver) -> None:
    a, b = replicas
    agent = ScriptedAgent()
    handler_a = a.request_handler(agent, push_card(), legacy=True)
    b.request_handler(agent, push_card(), legacy=True)  # B's workers share the deliveries
    assert isinstance(a.push_sender, RedisPushNotificationSender)
    config = push_config("", "x", TOKEN, CREDENTIALS, url=receiver.url("x"))
    pushed = await stream_legacy(handler_a, config)
    assert len(pushed) == 4  # Task, WORKING, artifact, COMPLETED
    hits = await all_delivered(receiver, "x", len(pushed))
    assert [h.body for h in hits] == pushed
    assert len({h.nid for h in hits}) == len(hits)
    assert all(h.headers["x-a2a-notification-token"] == TOKEN for h in hits)
    await eventually(
        lambda: not (a.push_sender.stats()["jobs"] or b.push_sender.stats()["jobs"]),  # type: ignore[union-attr]
        what="the job finished at COMPLETED",
    )
    assert await a.redis.xlen(a.push_config_store.keys.push_jobs) == 0
    assert len(receiver.delivered("x")) == len(pushed)  # nothing twice


async def test_the_legacy_handler_delivers_in_order_after_retries(replicas, receiver) -> None:
    a, b = replicas
    receiver.path("x").fail_first = 3
    handler = a.request_handler(ScriptedAgent(), push_card(), legacy=True)
    b.request_handler(ScriptedAgent(), push_card(), legacy=True)
    config = push_config("", "x", TOKEN, CREDENTIALS, url=receiver.url("x"))
    pushed = await stream_legacy(handler, config)
    hits = await all_delivered(receiver, "x", len(pushed))
    assert [h.body for h in hits] == pushed
    assert all(receiver.path("x").attempts[h.nid] == 4 for h in hits)
    first_try = [h.nid for h in receiver.hits]  # no attempt of event v+1 before v delivered
    assert first_try == sorted(first_try, key=[h.nid for h in hits].index)


async def test_legacy_events_are_delivered_by_the_other_replica(replicas, receiver) -> None:
    """A's sender stops while its handler runs the task: B delivers everything, once each
    (a notification in flight when A stopped may come twice, with the same id)."""
    a, b = replicas
    handler = a.request_handler(ScriptedAgent(), push_card(), legacy=True)
    b.request_handler(ScriptedAgent(), push_card(), legacy=True)
    assert a.push_sender is not None and b.push_sender is not None
    await a.push_sender.aclose()
    config = push_config("", "x", TOKEN, CREDENTIALS, url=receiver.url("x"))
    pushed = await stream_legacy(handler, config)
    hits = await all_delivered(receiver, "x", len(pushed))
    assert [h.body for h in hits] == pushed
    assert len({h.nid for h in hits}) == len(hits)
    assert b.push_sender.stats()["delivered"] == len(pushed)


async def test_legacy_dead_letters_are_delivered_by_push_retry(replicas, receiver) -> None:
    a, _ = replicas
    receiver.path("x").down = True  # FAST: 10 quick attempts each, then a dead letter
    handler = a.request_handler(ScriptedAgent(), push_card(), legacy=True)
    config = push_config("", "x", TOKEN, CREDENTIALS, url=receiver.url("x"))
    pushed = await stream_legacy(handler, config)
    keys = a.push_config_store.keys
    letters = await eventually(lambda: _letters(a, len(pushed)), what=f"{len(pushed)} dead letters")
    assert len({x.notification_id for x in letters}) == len(pushed)
    receiver.path("x").down = False
    assert await retry_dead(a.redis, keys) == len(pushed)
    hits = await all_delivered(receiver, "x", len(pushed))
    assert [h.body for h in hits] == pushed
    assert [h.nid for h in hits] == [x.notification_id for x in letters]


async def _letters(backend: RedisBackend, n: int) -> list[DeadLetter] | None:
    letters = await dead_letters(backend.redis, backend.push_config_store.keys)
    return letters if len(letters) >= n else None


async def test_a_legacy_log_with_undecodable_entries_dead_letters_them(replicas, receiver) -> None:
    """Entries the job cannot decode in a log without versions (the first one, and one
    after the Task) are dead-lettered by position; every other event arrives, in order."""
    a, _ = replicas
    a.request_handler(ScriptedAgent(), push_card(), legacy=True)
    config = push_config("tq", "x", TOKEN, CREDENTIALS, url=receiver.url("x"))
    await a.push_config_store.set_info("tq", config, ctx())
    key = a.push_config_store.keys.events("tq")
    await a.redis.xadd(key, {b"zz": b"not an event"})
    queue = await a.queue_manager.create_or_tap("tq")
    await queue.enqueue_event(make_task("tq", state=TaskState.TASK_STATE_WORKING))
    await a.redis.xadd(key, {b"zz": b"not an event either"})
    for i, state in enumerate((TaskState.TASK_STATE_WORKING, TaskState.TASK_STATE_COMPLETED)):
        await queue.enqueue_event(numbered(i, "tq", state))
    await queue.close(immediate=True)  # nobody consumes it here; its close mark is written
    hits = await all_delivered(receiver, "x", 3)
    assert [h.event().WhichOneof("payload") for h in hits] == [
        "task",
        "status_update",
        "status_update",
    ]
    assert [h.event().status_update.metadata["n"] for h in hits[1:]] == ["0", "1"]
    letters = await eventually(lambda: _letters(a, 2), what="2 dead letters")
    assert all("CorruptDataError" in x.error for x in letters)
    assert len({x.notification_id for x in letters} | {h.nid for h in hits}) == 5
