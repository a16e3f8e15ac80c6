"""Metrics and spans of the real flows, read with the SDK's in-memory reader and exporter."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
from a2a.server.cluster import ConcurrentTaskModificationError, TaskVersion, VersionedEvent
from a2a.types.a2a_pb2 import ListTasksRequest, TaskState, TaskStatusUpdateEvent
from opentelemetry.trace import SpanKind

from a2a_redis import telemetry
from a2a_redis.errors import PayloadTooLargeError, SubscriberLagError
from a2a_redis.events.event_stream import RedisTaskEventStream
from a2a_redis.events.queue_manager import RedisQueueManager
from a2a_redis.log.event_log import StreamRetention
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from tests.helpers import ctx, eventually, make_task
from tests.telemetry.conftest import Otel

MISSING = TaskVersion.MISSING


async def produce(
    store: VersionedRedisTaskStore, stream: RedisTaskEventStream, task_id: str, n: int
) -> TaskVersion:
    """A task and ``n`` WORKING status events, saved and published as the SDK does."""
    task = make_task(task_id)
    version = await store.save(task, event=task, prev_version=MISSING, context=ctx())
    await stream.publish(task_id, VersionedEvent(task, version))
    for _ in range(n):
        event = TaskStatusUpdateEvent(task_id=task_id, context_id="ctx")
        event.status.state = TaskState.TASK_STATE_WORKING
        task.status.state = TaskState.TASK_STATE_WORKING
        version = await store.save(task, event=event, prev_version=version, context=ctx())
        await stream.publish(task_id, VersionedEvent(event, version))
    return version


async def test_store_operations_record_duration_and_spans(
    otel: Otel, redis: aioredis.Redis, prefix: str
) -> None:
    store = VersionedRedisTaskStore(redis, prefix=prefix)
    task = make_task("task-1")
    version = await store.save(task, prev_version=MISSING, context=ctx())
    with pytest.raises(ConcurrentTaskModificationError):
        await store.save(task, prev_version=MISSING, context=ctx())
    assert await store.get("task-1", ctx()) is not None
    await store.list(ListTasksRequest(), ctx())
    await store.delete("task-1", ctx())
    await store.as_task_store.save(task, ctx("bob"))  # plain store: same instrument
    del version

    duration = "a2a_redis.store.duration"
    assert otel.value(duration, operation="save", outcome="ok") == 2
    assert otel.value(duration, operation="save", outcome="conflict") == 1
    for operation in ("get", "list", "delete"):
        assert otel.value(duration, operation=operation, outcome="ok") == 1
    assert {tuple(sorted(p.attributes)) for p in otel.points(duration)} == {
        ("operation", "outcome")
    }
    spans = otel.spans()
    assert sorted(s.name for s in spans) == sorted(
        ["a2a_redis save"] * 3 + ["a2a_redis get", "a2a_redis list", "a2a_redis delete"]
    )
    for span in spans:
        assert span.kind is SpanKind.CLIENT
        assert span.attributes is not None
        assert span.attributes["db.system.name"] == "redis"
        assert span.attributes["db.operation.name"] == span.name.split()[-1]
    conflicted = [s for s in spans if (s.attributes or {}).get("a2a_redis.conflicts") == 1]
    assert len(conflicted) == 1
    otel.assert_no_identifiers()


async def test_store_span_nests_under_the_callers_span(
    otel: Otel, redis: aioredis.Redis, prefix: str
) -> None:
    store = VersionedRedisTaskStore(redis, prefix=prefix)
    with otel.tracer.start_as_current_span("handler") as handler:
        await store.save(make_task("task-1"), prev_version=MISSING, context=ctx())
    (save,) = otel.spans("a2a_redis save")
    assert save.parent is not None
    assert save.parent.span_id == handler.get_span_context().span_id
    assert save.context is not None
    assert save.context.trace_id == handler.get_span_context().trace_id


async def test_the_sdk_switch_turns_spans_off_not_metrics(
    otel: Otel, redis: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(telemetry.ENABLED_ENV_VAR, "false")
    otel.install(tracing=None)  # read the switch from the environment, as at import
    store = VersionedRedisTaskStore(redis, prefix=prefix)
    with otel.tracer.start_as_current_span("handler"):
        await store.save(make_task("task-1"), prev_version=MISSING, context=ctx())
    assert [s.name for s in otel.spans()] == ["handler"]
    assert otel.value("a2a_redis.store.duration", operation="save", outcome="ok") == 1


async def test_a_hundred_events_make_one_subscriber_span_with_bounded_links(
    otel: Otel, client_factory: Callable[[], aioredis.Redis], redis: aioredis.Redis, prefix: str
) -> None:
    """Spans per operation, not per delivered event; links capped at MAX_LINKS."""
    a_client, b_client = client_factory(), client_factory()
    a_store = VersionedRedisTaskStore(a_client, prefix=prefix)
    a = RedisTaskEventStream(a_client, task_store=a_store)
    b = RedisTaskEventStream(b_client, task_store=VersionedRedisTaskStore(b_client, prefix=prefix))
    got: list[VersionedEvent] = []

    async def follow() -> None:
        async for item in b.subscribe("task-1", after=MISSING):
            got.append(item)
            if len(got) == 101:
                return

    try:
        follower = asyncio.ensure_future(contextvars.Context().run(follow))
        await eventually(lambda: otel.value("a2a_redis.stream.subscribers") == 1)
        task = make_task("task-1")
        with otel.tracer.start_as_current_span("request"):
            version = await a_store.save(task, event=task, prev_version=MISSING, context=ctx())
        for _ in range(100):  # each event written in a request span of its own
            with otel.tracer.start_as_current_span("request"):
                event = TaskStatusUpdateEvent(task_id="task-1", context_id="ctx")
                event.status.state = task.status.state = TaskState.TASK_STATE_WORKING
                version = await a_store.save(task, event=event, prev_version=version, context=ctx())
                await a.publish("task-1", VersionedEvent(event, version))
        await asyncio.wait_for(follower, 20)
    finally:
        await a.aclose()
        await b.aclose()
    (subscribe,) = otel.spans("a2a_redis subscribe")
    assert len(subscribe.links) == telemetry.MAX_LINKS
    assert (subscribe.attributes or {})["a2a_redis.links"] == telemetry.MAX_LINKS
    request_traces = {s.context.trace_id for s in otel.spans("request") if s.context}
    assert {link.context.trace_id for link in subscribe.links} <= request_traces
    assert len(otel.spans("a2a_redis save")) == 101  # one per store operation
    assert otel.value("a2a_redis.stream.delivery_latency") == 101
    assert otel.value("a2a_redis.stream.delivery_latency", path="live") >= 100
    assert otel.value("a2a_redis.stream.subscribers") == 0
    otel.assert_no_identifiers()


async def test_payload_rejection_and_lag_are_counted(
    otel: Otel, client_factory: Callable[[], aioredis.Redis], redis: aioredis.Redis, prefix: str
) -> None:
    small = VersionedRedisTaskStore(redis, prefix=prefix, max_payload_bytes=64)
    big = make_task("task-big")
    big.metadata["blob"] = "x" * 200
    with pytest.raises(PayloadTooLargeError):
        await small.save(big, prev_version=MISSING, context=ctx())
    assert otel.value("a2a_redis.payload.rejected", reason="too_large") == 1
    assert otel.value("a2a_redis.store.duration", operation="save", outcome="error") == 1

    store = VersionedRedisTaskStore(
        redis, prefix=prefix, stream_retention=StreamRetention(maxlen=1)
    )
    stream = RedisTaskEventStream(redis, task_store=store)
    try:
        await produce(store, stream, "task-1", 250)  # MAXLEN ~ 1 trims whole nodes of 100
        with pytest.raises(SubscriberLagError):
            async for _ in stream.subscribe("task-1", after=TaskVersion(1)):
                pass
    finally:
        await stream.aclose()
    assert otel.value("a2a_redis.subscriber.lagged") == 1
    (subscribe,) = otel.spans("a2a_redis subscribe")
    assert subscribe.status.description == "SubscriberLagError"


async def test_old_entries_without_context_still_decode(
    otel: Otel, redis: aioredis.Redis, prefix: str
) -> None:
    store = VersionedRedisTaskStore(redis, prefix=prefix)
    stream = RedisTaskEventStream(redis, task_store=store)
    try:
        telemetry.configure(enabled=False)  # as an older release wrote them: no "t" field
        await produce(store, stream, "task-1", 2)
        otel.install()
        rows = await redis.xrange(store.keys.events("task-1"))
        assert all(b"t" not in fields for _, fields in rows)
        got = []
        async for item in stream.subscribe("task-1", after=MISSING):
            got.append(item)
            if len(got) == 3:
                break
    finally:
        await stream.aclose()
    assert [v.version for v in got] == [TaskVersion(1), TaskVersion(2), TaskVersion(3)]
    (subscribe,) = otel.spans("a2a_redis subscribe")
    assert subscribe.links == ()
    assert otel.value("a2a_redis.stream.delivery_latency") == 0


async def test_leases_and_taps_are_observed(
    otel: Otel, client_factory: Callable[[], aioredis.Redis], redis: aioredis.Redis, prefix: str
) -> None:
    owner = RedisQueueManager(client_factory(), prefix=prefix)
    other = RedisQueueManager(client_factory(), prefix=prefix)
    try:
        queue = await owner.create_or_tap("task-1")
        assert otel.value("a2a_redis.leases.held") == 1
        assert otel.value("a2a_redis.queue.taps") == 0
        tap = await other.tap("task-1")
        assert tap is not None
        assert otel.value("a2a_redis.queue.taps") == 1
        await queue.close()
        await tap.close(immediate=True)
    finally:
        await owner.aclose()
        await other.aclose()
    assert otel.value("a2a_redis.leases.held") == 0
    assert otel.value("a2a_redis.queue.taps") == 0


async def test_log_records_carry_trace_ids_and_no_payload(
    otel: Otel, redis: aioredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = VersionedRedisTaskStore(redis, prefix=prefix)
    stream = RedisTaskEventStream(redis, task_store=store)
    secret = "secret-marker-7c1f"
    try:
        task = make_task("task-1")
        task.metadata["note"] = secret
        await store.save(task, event=task, prev_version=MISSING, context=ctx())
        await redis.xadd(store.keys.events("task-1"), {b"f": b"1", b"v": b"2", b"e": b"\xff"})
        caplog.set_level(logging.WARNING, logger="a2a_redis")
        with otel.tracer.start_as_current_span("reader") as reader:
            async for _ in stream.subscribe("task-1", after=TaskVersion(1)):
                pass
    except Exception as e:
        assert type(e).__name__ == "CorruptDataError"
    finally:
        await stream.aclose()
    ours = [r for r in caplog.records if r.name.startswith("a2a_redis")]
    assert ours, "the unreadable entry is logged"
    context = reader.get_span_context()
    for record in ours:
        assert record.trace_id == f"{context.trace_id:032x}"  # type: ignore[attr-defined]
        assert record.span_id  # type: ignore[attr-defined]
        assert secret not in record.getMessage()
