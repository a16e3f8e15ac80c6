"""RedisBackend: URLs, one shared pool, the one-line handler, probes and ownership."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from a2a.helpers.proto_helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events.event_queue import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler, LegacyRequestHandler
from a2a.server.tasks.task_updater import TaskUpdater
from a2a.types import (
    GetTaskRequest,
    Part,
    TaskState,
)
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

from a2a_redis import (
    RedisBackend,
    RedisPushNotificationConfigStore,
    RedisQueueManager,
    RedisTaskEventStream,
    RedisTaskStore,
    RedisUnavailableError,
    VersionedRedisTaskStore,
)
from a2a_redis.ops.embedded import EmbeddedServer
from tests.helpers import agent_card, connect, ctx, send_request

CARD = agent_card()


class DoneAgent(AgentExecutor):
    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        if context.current_task is None:
            await event_queue.enqueue_event(new_task_from_user_message(context.message))
        await updater.add_artifact([Part(text="answer")], name="answer")
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Nothing to stop."""


async def test_components_share_one_client_and_one_listener(real_url: str, prefix: str):
    async with RedisBackend.from_url(real_url, prefix=prefix) as backend:
        assert isinstance(backend.task_store, VersionedRedisTaskStore)
        assert isinstance(backend.plain_task_store, RedisTaskStore)
        assert isinstance(backend.event_stream, RedisTaskEventStream)
        assert isinstance(backend.queue_manager, RedisQueueManager)
        assert isinstance(backend.push_config_store, RedisPushNotificationConfigStore)
        assert backend.event_stream.listener is backend.listener
        assert backend.queue_manager.listener is backend.listener
        for component in (backend.event_stream, backend.queue_manager, backend.task_store):
            assert component.redis is backend.redis
        if isinstance(backend.redis, RedisCluster):  # per node pools; a gate of 64 turns
            assert backend.redis.permits._value == 64
            assert all(n.max_connections == 64 for n in backend.redis.get_nodes())
        else:
            pool = backend.redis.connection_pool
            assert isinstance(pool, aioredis.BlockingConnectionPool)
            assert pool.max_connections == 64


async def test_one_line_handler_v2_and_legacy(real_url: str, prefix: str):
    async with RedisBackend.from_url(real_url, prefix=prefix) as backend:
        for legacy, kind in ((False, DefaultRequestHandler), (True, LegacyRequestHandler)):
            handler = backend.request_handler(DoneAgent(), CARD, legacy=legacy)
            assert isinstance(handler, kind)
            task = await handler.on_message_send(send_request("hi"), ctx())
            assert task.status.state == TaskState.TASK_STATE_COMPLETED  # type: ignore[union-attr]
            stored = await backend.task_store.get(task.id, ctx())  # type: ignore[union-attr]
            assert stored is not None
            assert stored.task.status.state == TaskState.TASK_STATE_COMPLETED
            got = await handler.on_get_task(GetTaskRequest(id=stored.task.id), ctx())
            assert got is not None
            assert got.artifacts[0].parts[0].text == "answer"
            if not legacy:
                await handler.aclose()  # type: ignore[attr-defined]


async def test_ping_and_health(real_url: str, prefix: str):
    async with RedisBackend.from_url(real_url, prefix=prefix) as backend:
        assert await backend.ping() > 0
        health = await backend.health()
        assert health["ok"] is True
        assert health["redis"] is True
        assert health["rtt_ms"] > 0
        assert health["listener"]["subscribers"] == 0
        assert health["queues"] == {"queues": 0, "leases": 0, "taps": 0}


async def test_outage_is_reported_by_probes_and_healed_by_a_restart(prefix: str):
    with EmbeddedServer() as server:
        backend = RedisBackend.from_url(server.url, prefix=prefix, socket_connect_timeout=1)
        assert (await backend.health())["ok"]
        server.kill()
        with pytest.raises(RedisUnavailableError):
            await backend.ping()
        health = await backend.health()
        assert health["ok"] is False
        assert health["redis"] is False
        assert health["error"]
        server.start()
        assert (await backend.health())["ok"]
        await backend.aclose()


async def test_url_forms_password_db_and_unix_socket(prefix: str):
    sock_dir = tempfile.mkdtemp(prefix="a2a-redis-sock-")
    sock = str(Path(sock_dir) / "redis.sock")
    args = ("--requirepass", "s3cret", "--unixsocket", sock, "--unixsocketperm", "700")
    with EmbeddedServer(extra_args=args) as server:
        tcp = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        async with RedisBackend.from_url(tcp, prefix=prefix) as backend:
            await backend.ping()
            assert backend.redis.connection_pool.connection_kwargs["db"] == 3
        unix = f"unix://:s3cret@{sock}?db=2"
        async with RedisBackend.from_url(unix, prefix=prefix) as backend:
            await backend.ping()
            assert backend.redis.connection_pool.connection_class is UnixDomainSocketConnection
        async with RedisBackend.from_url(f"redis://127.0.0.1:{server.port}") as backend:
            with pytest.raises(Exception, match=r"(?i)auth|NOAUTH"):
                await backend.ping()
    tls = RedisBackend.from_url("rediss://127.0.0.1:6380/0")  # not connected until used
    assert tls.redis.connection_pool.connection_class is SSLConnection
    await tls.aclose()


def test_unsupported_url_scheme_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"redis://, rediss:// .* unix://, redis\+cluster:// or redis\+sentinel://"
    ):
        RedisBackend.from_url("http://localhost:6379")


async def test_a_users_client_is_never_closed(real_url: str, prefix: str):
    client = connect(real_url)
    async with RedisBackend(client, prefix=prefix) as backend:
        await backend.ping()
    assert await client.ping()  # still usable: the backend did not own it
    await client.aclose()
