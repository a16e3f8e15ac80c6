"""Secrets and tenants with delivery on: the handler's sender delivers, retries, dead-letters.

* **Secrets.** With an ``encryption_key``, after deliveries, retries and dead letters, no
  key under the prefix (configs, delivery state, jobs, dead letters) holds a token, a
  credential or a hook URL in any encoding, and no log record at DEBUG (every logger, httpx
  included) carries a token or a credential; the receiver did get them, in its headers.
* **Tenants.** Two owners' tasks and configs on one handler: each receiver gets only its
  owner's task, with its owner's token; another owner cannot add a config to the task.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import pytest
from a2a.types.a2a_pb2 import TaskPushNotificationConfig, TaskState
from a2a.utils.errors import TaskNotFoundError
from cryptography.fernet import Fernet

from a2a_redis import RedisBackend
from a2a_redis.push.dead import dead_letters
from tests.helpers import ScriptedAgent, connect, ctx, eventually, push_card, push_config
from tests.helpers import send_request as request
from tests.push.receiver import Receiver, running_receiver
from tests.push.test_delivery import FAST
from tests.reliability.test_secrets import dump_prefix, holding, record_text

GUARD = 60.0  # seconds: a hang guard only


def secret(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as r:
        yield r


def completed(receiver: Receiver, path: str) -> bool:
    return any(
        h.event().status_update.status.state == TaskState.TASK_STATE_COMPLETED
        for h in receiver.delivered(path)
    )


async def test_no_secret_at_rest_in_dead_letters_or_in_logs_with_delivery_on(
    real_url: str, prefix: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token, credentials = secret("token"), secret("cred")
    receiver.path("x").fail_first = 2  # retried
    receiver.path("gone").fail_status, receiver.path("gone").down = 404, True  # dead letters
    options = {"allow_hosts": ["127.0.0.1"], "claim_after": 1.0, "retry": FAST}
    backend = RedisBackend(
        connect(real_url), prefix=prefix, encryption_key=Fernet.generate_key(),
        push_options=options,
    )  # fmt: skip
    handler = backend.request_handler(ScriptedAgent(), push_card())
    try:
        for path in ("x", "gone"):
            config = push_config("", path, token, credentials, url=receiver.url(path))
            send = handler.on_message_send(request("complete", config), ctx())
            await asyncio.wait_for(send, GUARD)
        await eventually(lambda: completed(receiver, "x"), what="COMPLETED delivered")
        await eventually(lambda: backend.push_sender.stats()["dead"] >= 4, what="dead letters")
        assert backend.push_sender.stats()["retried"] >= 2
        hits = receiver.delivered("x")
        assert {h.headers["x-a2a-notification-token"] for h in hits} == {token}
        assert {h.headers["authorization"] for h in hits} == {f"Bearer {credentials}"}
        letters = await dead_letters(backend.redis, backend.push_config_store.keys)
        assert {x.error for x in letters} == {"HTTP 404"}

        blobs = await dump_prefix(backend.redis, prefix)
        kinds = {key.rsplit(b":", 1)[-1] for key in blobs}
        assert {b"push", b"pushstate", b"jobs", b"dead"} <= kinds  # every push key was read
        for value in (token, credentials, receiver.url("x"), receiver.url("gone")):
            assert holding(blobs, value) == [], value
        logged = [record_text(r) for r in caplog.records]
        assert logged  # DEBUG records were captured
        assert [t for t in logged if token in t or credentials in t] == []
    finally:
        await backend.aclose()
        await backend.redis.aclose()


async def test_each_owner_receives_only_its_tasks(
    real_url: str, prefix: str, receiver: Receiver
) -> None:
    options = {"allow_hosts": ["127.0.0.1"], "claim_after": 1.0, "retry": FAST}
    backend = RedisBackend(connect(real_url), prefix=prefix, push_options=options)
    handler = backend.request_handler(ScriptedAgent(), push_card())
    try:
        tasks = {}
        for owner in ("alice", "bob"):  # each waits for input, with a config
            config = push_config("", "hook", f"tok-{owner}", f"cred-{owner}", receiver.url(owner))
            send = handler.on_message_send(request("input please", config), ctx(owner))
            tasks[owner] = await asyncio.wait_for(send, GUARD)
        intruder = TaskPushNotificationConfig(
            task_id=tasks["alice"].id, id="hook", url=receiver.url("bob"), token="tok-bob"
        )
        with pytest.raises(TaskNotFoundError):
            await handler.on_create_task_push_notification_config(intruder, ctx("bob"))
        for owner, task in tasks.items():
            answer = request("complete", task_id=task.id, context_id=task.context_id)
            await asyncio.wait_for(handler.on_message_send(answer, ctx(owner)), GUARD)
            await eventually(lambda o=owner: completed(receiver, o), what=f"{owner}'s end")
        for owner in ("alice", "bob"):
            hits = receiver.delivered(owner)
            ids = {
                h.event().task.id
                or h.event().status_update.task_id
                or h.event().artifact_update.task_id
                for h in hits
            }
            assert ids == {tasks[owner].id}
            assert {h.headers["x-a2a-notification-token"] for h in hits} == {f"tok-{owner}"}
        alice_ids = {h.nid for h in receiver.delivered("alice")}
        assert alice_ids.isdisjoint(h.nid for h in receiver.delivered("bob"))
    finally:
        await backend.aclose()
        await backend.redis.aclose()
