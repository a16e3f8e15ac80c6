"""Across replicas: reconnect counting, and trace context carried from writer to subscriber.

The reconnect test kills pub/sub connections with CLIENT KILL, so it runs on a private
embedded server (the shared one serves other suites). The propagation tests write on one
backend (in a span) and subscribe on another in a fresh ``contextvars.Context``: in
process with two clients, and across two processes.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.types.a2a_pb2 import Task, TaskState, TaskStatusUpdateEvent
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from a2a_redis.ops.embedded import EmbeddedServer
from tests.helpers import (
    ROOT,
    backend_pair,
    ctx,
    eventually,
    make_task,
    start_task,
    subscriber_count,
)
from tests.telemetry.conftest import Otel

MISSING = TaskVersion.MISSING


@pytest.fixture
def private_server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer() as server:
        yield server


async def test_reconnects_after_client_kill_are_counted(
    otel: Otel, private_server: EmbeddedServer, prefix: str
) -> None:
    """redis-py reconnects a killed pub/sub connection by itself: stats, health and the
    counter still see it."""
    url = private_server.url
    async with backend_pair(url, prefix) as (a, b), aioredis.Redis.from_url(url) as admin:
        task, version = await start_task(a.task_store)
        seen: list[VersionedEvent] = []

        async def follow() -> None:
            async for item in b.event_stream.subscribe("t", after=version):
                seen.append(item)
                return

        follower = asyncio.ensure_future(follow())
        await eventually(lambda: subscriber_count(admin, b.task_store.keys.wake("t")))
        assert b.listener.stats()["reconnects"] == 0
        await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await eventually(lambda: b.listener.stats()["reconnects"] >= 1)
        await eventually(lambda: subscriber_count(admin, b.task_store.keys.wake("t")))
        event = TaskStatusUpdateEvent(task_id="t", context_id="ctx")
        event.status.state = task.status.state = TaskState.TASK_STATE_COMPLETED
        version = await a.task_store.save(task, event=event, prev_version=version, context=ctx())
        await a.event_stream.publish("t", VersionedEvent(event, version))
        await asyncio.wait_for(follower, 20)  # a hang guard only
        assert seen[0].version == version
        assert (await b.health())["listener"]["reconnects"] >= 1
    assert otel.value("a2a_redis.listener.reconnects") >= 1


async def test_trace_context_crosses_to_a_subscriber_on_another_backend(
    otel: Otel, real_url: str, prefix: str
) -> None:
    async with backend_pair(real_url, prefix) as (a, b):
        with otel.tracer.start_as_current_span("request on A") as request:
            _task, version = await start_task(a.task_store)
        (save,) = otel.spans("a2a_redis save")

        async def first_event() -> VersionedEvent:
            async for item in b.event_stream.subscribe("t", after=MISSING):
                return item
            raise AssertionError("no event")

        got = await contextvars.Context().run(asyncio.ensure_future, first_event())
        assert got.version == version
    (subscribe,) = otel.spans("a2a_redis subscribe")
    assert subscribe.parent is None  # B ran in a fresh context: only the link joins them
    (link,) = subscribe.links
    assert link.context.trace_id == request.get_span_context().trace_id
    assert save.context is not None
    assert link.context.span_id == save.context.span_id
    assert link.context.is_remote
    assert otel.value("a2a_redis.stream.delivery_latency", path="backlog") == 1


WRITER = textwrap.dedent(
    """
    import asyncio, json, sys
    from opentelemetry.sdk.trace import TracerProvider
    from a2a_redis import RedisBackend, telemetry
    from tests.helpers import start_task

    async def main(url, prefix):
        provider = TracerProvider()
        telemetry.configure(tracer_provider=provider)
        async with RedisBackend.from_url(url, prefix=prefix) as backend:
            with provider.get_tracer("writer").start_as_current_span("request") as span:
                await start_task(backend.task_store)
                context = span.get_span_context()
        print(json.dumps({"trace_id": context.trace_id}))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_trace_context_crosses_processes(otel: Otel, real_url: str, prefix: str) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", WRITER, real_url, prefix],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    written = json.loads(done.stdout.strip().splitlines()[-1])
    async with backend_pair(real_url, prefix) as (b, _):
        async for _item in b.event_stream.subscribe("t", after=MISSING):
            break
    (subscribe,) = otel.spans("a2a_redis subscribe")
    assert [link.context.trace_id for link in subscribe.links] == [written["trace_id"]]


class Canceller:
    """A request handler's cancel hook, recording the span it runs in."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    async def cancel_here(self, task_id: str) -> Task | None:
        self.spans.append(trace.get_current_span().get_span_context())
        return make_task(task_id, state=TaskState.TASK_STATE_CANCELED)


async def test_a_forwarded_cancel_continues_the_senders_trace(
    otel: Otel, real_url: str, prefix: str
) -> None:
    async with backend_pair(real_url, prefix) as (a, b):
        canceller = Canceller()
        a.control.register(canceller)
        await a.control.ready()
        await a.leases.take("t")  # A runs the task: B forwards the cancel to A
        with otel.tracer.start_as_current_span("cancel request on B") as request:
            task = await b.control.forward_cancel("t")
        assert task is not None
        assert task.status.state == TaskState.TASK_STATE_CANCELED
    (served,) = otel.spans("a2a_redis serve cancel")
    sent = request.get_span_context()
    assert served.kind is SpanKind.SERVER
    assert served.parent is not None
    assert (served.parent.trace_id, served.parent.span_id) == (sent.trace_id, sent.span_id)
    assert canceller.spans[0].trace_id == sent.trace_id  # the cancel ran inside it
    otel.assert_no_identifiers()
