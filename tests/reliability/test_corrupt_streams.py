"""Corrupt stream entries and garbage wake-ups, met by live subscribers and remote taps.

The documented rule (README, "Corrupt data"): an entry that cannot be decoded is never
skipped silently. A subscriber that needs it (its version, when readable, is after the
subscriber's ``after`` and was not delivered already) ends with ``CorruptDataError``
(``UnsupportedSchemaError`` for a newer schema) naming the stream key and the entry id; a
legacy remote tap closes there. The entry is logged at WARNING with the key and entry id,
never its bytes. The listener, the other subscribers of the task that do not need the
entry, and every other task's subscribers on the same listener carry on.

Entries are planted with XADD into the task's stream key (built with ``Keys``), between
two good entries written by the store, while a subscriber follows: the foreign writer
publishes no wake-up, so the listener must notice the entry between the good ones rather
than jump over it. Wake-ups are planted with PUBLISH on the task's channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgpack
import pytest
import redis.asyncio as aioredis
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.server.events.event_queue import QueueShutDown
from a2a.types.a2a_pb2 import TaskState
from a2a.utils.proto_utils import to_stream_response

from a2a_redis import (
    CorruptDataError,
    Keys,
    RedisQueueManager,
    RedisTaskEventStream,
    StreamListener,
    UnsupportedSchemaError,
    VersionedRedisTaskStore,
)
from a2a_redis.log.codec import version_int
from tests.helpers import Follow, ctx, make_task, numbered, start_task

MISSING = TaskVersion.MISSING
GUARD = 30  # seconds: a hang guard only
SECRET = b"SECRET-PAYLOAD"  # planted bytes that must never reach a log
GOOD = to_stream_response(numbered(0, "t")).SerializeToString()

# Fields of a planted entry (V: the version the next good write will also get), and the
# error a subscriber that needs it ends with.
CORRUPT: dict[str, tuple[dict[bytes, bytes], type[CorruptDataError]]] = {
    "no-event": ({b"f": b"1", b"v": b"3"}, CorruptDataError),
    "garbage-event": ({b"f": b"1", b"v": b"3", b"e": b"\xff\xfe" + SECRET}, CorruptDataError),
    "truncated-event": ({b"f": b"1", b"v": b"3", b"e": GOOD[: len(GOOD) // 2]}, CorruptDataError),
    "no-schema": ({b"v": b"3", b"e": GOOD}, CorruptDataError),
    "garbage-version": ({b"f": b"1", b"v": SECRET, b"e": GOOD}, CorruptDataError),
    "newer-schema": ({b"f": b"2", b"v": b"3", b"e": GOOD + SECRET}, UnsupportedSchemaError),
}


class Writer:
    """The executing replica: save + publish, as the SDK does."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.store = VersionedRedisTaskStore(redis, prefix=prefix)
        self.stream = RedisTaskEventStream(redis, task_store=self.store)
        self.versions: dict[str, TaskVersion] = {}

    async def start(self, task_id: str) -> TaskVersion:
        _, v = await start_task(self.store, task_id)
        self.versions[task_id] = v
        return v

    async def emit(self, task_id: str, n: int) -> TaskVersion:
        event = numbered(n, task_id)
        task = make_task(task_id, state=TaskState.TASK_STATE_WORKING)
        v = await self.store.save(
            task, event=event, prev_version=self.versions[task_id], context=ctx()
        )
        await self.stream.publish(task_id, VersionedEvent(event, v))
        self.versions[task_id] = v
        return v


async def joined(listener: StreamListener, n: int) -> None:
    while listener.stats()["subscribers"] < n:  # bounded by the test's timeout
        await asyncio.sleep(0.005)


@pytest.fixture
async def replicas(redis: aioredis.Redis, prefix: str):
    writer = Writer(redis, prefix)
    reader = RedisTaskEventStream(redis, prefix=prefix)  # another replica's listener
    yield writer, reader
    await reader.aclose()
    await writer.stream.aclose()


@pytest.mark.parametrize("case", list(CORRUPT))
async def test_a_subscriber_that_needs_a_corrupt_entry_ends_with_the_typed_error(
    replicas, redis: aioredis.Redis, prefix: str, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="a2a_redis")
    writer, reader = replicas
    fields, error_type = CORRUPT[case]
    events_key = Keys(prefix).events("t")
    v1, u1 = await writer.start("t"), await writer.start("u")
    on_t, on_u = Follow(reader.subscribe("t", after=v1)), Follow(reader.subscribe("u", after=u1))
    try:
        await joined(reader.listener, 2)
        await writer.emit("t", 1)
        await on_t.until(1)
        entry_id = (await redis.xadd(events_key, fields)).decode()  # a foreign writer
        v3 = await writer.emit("t", 2)
        error = await on_t.ended()  # neither the good event after it, nor stuck
        assert isinstance(error, error_type), error
        assert error.key == events_key and f"stream entry {entry_id}" in str(error)
        assert on_t.ns == [1]
        await writer.emit("u", 1)  # the same listener serves the other task as before
        await on_u.until(1)
        assert on_u.ns == [1] and reader.listener.stats()["connected"]
        late = Follow(reader.subscribe("t", after=v3))  # past it: it does not need it
        await joined(reader.listener, 2)
        await writer.emit("t", 3)
        await late.until(1)
        assert late.ns == [3]
        replay = Follow(reader.subscribe("t", after=TaskVersion(2)))  # needs it: the backlog
        assert isinstance(await replay.ended(), error_type) and replay.ns == []
        await late.close()
    finally:
        await on_t.close()
        await on_u.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(events_key in m and entry_id in m for m in warnings), warnings
    assert SECRET.decode() not in caplog.text  # never the entry's bytes


async def test_a_corrupt_copy_of_a_version_already_delivered_is_not_needed(
    replicas, redis: aioredis.Redis, prefix: str
) -> None:
    writer, reader = replicas
    v1 = await writer.start("t")
    on_t = Follow(reader.subscribe("t", after=v1))
    try:
        await joined(reader.listener, 1)
        v2 = await writer.emit("t", 1)
        await on_t.until(1)
        copy = {b"f": b"1", b"v": b"%d" % version_int(v2), b"e": b"\xff"}
        await redis.xadd(Keys(prefix).events("t"), copy)
        await writer.emit("t", 2)
        await on_t.until(2)
        assert on_t.ns == [1, 2] and on_t.error is None
        replay = Follow(reader.subscribe("t", after=v1))  # the same from the backlog
        await replay.until(2)
        assert replay.ns == [1, 2] and replay.error is None
        await replay.close()
    finally:
        await on_t.close()


async def test_a_subscriber_behind_the_ring_meets_it_when_catching_up(
    redis: aioredis.Redis, prefix: str
) -> None:
    writer = Writer(redis, prefix)
    listener = StreamListener(redis, Keys(prefix), ring_size=2)
    reader = RedisTaskEventStream(redis, prefix=prefix, listener=listener)
    v1 = await writer.start("t")
    slow = reader.subscribe("t", after=v1)
    try:
        first = asyncio.ensure_future(anext(slow))
        await joined(listener, 1)
        await writer.emit("t", 1)
        assert int((await asyncio.wait_for(first, GUARD)).event.metadata["n"]) == 1
        await redis.xadd(Keys(prefix).events("t"), CORRUPT["garbage-event"][0])
        for n in range(2, 7):  # the ring (2 entries) moves on while the subscriber sleeps
            await writer.emit("t", n)
        with pytest.raises(CorruptDataError) as info:
            await asyncio.wait_for(anext(slow), GUARD)
        assert info.value.key == Keys(prefix).events("t")
    finally:
        await slow.aclose()
        await listener.aclose()
        await writer.stream.aclose()


async def test_a_remote_tap_meeting_a_corrupt_entry_closes_and_others_carry_on(
    redis: aioredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="a2a_redis")
    owner, remote = RedisQueueManager(redis, prefix=prefix), RedisQueueManager(redis, prefix=prefix)
    try:
        queue, other = await owner.create_or_tap("q"), await owner.create_or_tap("r")
        tap, other_tap = await remote.tap("q"), await remote.tap("r")
        assert tap is not None and other_tap is not None
        await queue.enqueue_event(numbered(1, "q"))
        assert (await asyncio.wait_for(tap.dequeue_event(), GUARD)).metadata["n"] == "1"
        entry_id = await redis.xadd(Keys(prefix).events("q"), {b"f": b"1", b"e": SECRET})
        await queue.enqueue_event(numbered(2, "q"))
        with pytest.raises(QueueShutDown):  # closed at the corrupt entry: never event 2
            await asyncio.wait_for(tap.dequeue_event(), GUARD)
        await other.enqueue_event(numbered(1, "r"))  # the same listener, another task
        assert (await asyncio.wait_for(other_tap.dequeue_event(), GUARD)).metadata["n"] == "1"
    finally:
        await remote.aclose()
        await owner.aclose()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(entry_id.decode() in m and "remote tap failed" in m for m in warnings), warnings
    assert SECRET.decode() not in caplog.text


FAR = b"99999999999999-0"
WAKE_UPS: dict[str, Callable[[bytes], bytes]] = {
    "binary": lambda last: b"\xff\x00" + SECRET,
    "old-format": lambda last: b"1-1\n" + msgpack.packb({b"f": 1}),
    "bad-entry-id": lambda last: last + b" 1x-1\n" + msgpack.packb({b"f": b"1"}),
    "huge-entry-id": lambda last: b"9" * 5000 + b"-1 " + FAR + b"\n" + msgpack.packb({}),
    "not-a-map": lambda last: last + b" " + FAR + b"\n" + msgpack.packb([1, 2]),
    "bad-msgpack": lambda last: last + b" " + FAR + b"\n\xc1",
    "non-bytes-fields": lambda last: last + b" " + FAR + b"\n" + msgpack.packb({b"f": 1}),
    "undecodable-entry": lambda last: (  # follows the real last entry: only decoding fails
        last + b" " + FAR + b"\n" + msgpack.packb({b"f": b"1", b"v": b"9", b"e": SECRET})
    ),
}


@pytest.mark.parametrize("case", list(WAKE_UPS))
async def test_a_garbage_wake_up_neither_kills_the_listener_nor_skips_events(
    replicas, redis: aioredis.Redis, prefix: str, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="a2a_redis")
    writer, reader = replicas
    keys = Keys(prefix)
    v1, u1 = await writer.start("t"), await writer.start("u")
    on_t, on_u = Follow(reader.subscribe("t", after=v1)), Follow(reader.subscribe("u", after=u1))
    try:
        await joined(reader.listener, 2)
        await writer.emit("t", 1)
        await on_t.until(1)
        ((last, _),) = await redis.xrevrange(keys.events("t"), count=1)
        await redis.publish(keys.wake("t"), WAKE_UPS[case](last))
        await writer.emit("t", 2)
        await writer.emit("u", 1)
        await on_t.until(2)
        await on_u.until(1)
        assert on_t.ns == [1, 2] and on_u.ns == [1]
        assert on_t.error is None and on_u.error is None
        assert reader.listener.stats()["connected"]  # and "u" was read after it: still runs
    finally:
        await on_t.close()
        await on_u.close()
    assert SECRET.decode() not in caplog.text
