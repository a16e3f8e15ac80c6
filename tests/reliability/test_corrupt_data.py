"""Corrupt and foreign data planted under our prefix: typed errors, nothing else harmed.

tests/stores/test_store_bad_input.py covers garbage task payloads, a bad version or schema field,
and a task key or the "all" index holding a string. This module adds:

* decoders fuzzed with hypothesis: every input decodes or raises ``CorruptDataError``;
* every truncation of a task payload, and fields whose bytes crash a naive decoder;
* a key of the wrong type met by a write (the stream, each index, the expiry zset): the
  write raises naming that key and writes nothing (Redis does not roll a script back);
* the stream, the lease and the push-config key of the wrong type met by reads;
* garbage ListTasks index members: ``CorruptDataError`` naming the index.

Corrupt stream entries and garbage wake-ups, met by subscribers and remote taps, are in
tests/reliability/test_corrupt_streams.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import msgpack
import pytest
import redis.asyncio as aioredis
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.types.a2a_pb2 import (
    Artifact,
    ListTasksRequest,
    Message,
    Part,
    Role,
    TaskState,
)
from a2a.utils.proto_utils import to_stream_response
from hypothesis import given, settings
from hypothesis import strategies as st

from a2a_redis import (
    CorruptDataError,
    RedisQueueManager,
    RedisTaskEventStream,
    VersionedRedisTaskStore,
)
from a2a_redis.connection.cluster import is_cluster
from a2a_redis.log.codec import (
    decode_event,
    decode_head,
    decode_locator,
    decode_task,
    member_cursor,
    member_task_id,
)
from a2a_redis.log.event_log import decode_rows, unpack_wake
from tests.helpers import ctx, make_task, numbered

MISSING = TaskVersion.MISSING
S = TaskState
GUARD = 30  # seconds: a hang guard only
SECRET = b"SECRET-PAYLOAD"  # planted bytes that must never reach a log
GOOD_EVENT = to_stream_response(numbered(0, "t")).SerializeToString()


def rich_task() -> bytes:
    task = make_task("t", state=S.TASK_STATE_WORKING, ts_ns=10**18)
    task.history.append(Message(message_id="m", role=Role.ROLE_USER, parts=[Part(text="hi")]))
    task.artifacts.append(Artifact(artifact_id="a", parts=[Part(text="x" * 40)]))
    task.metadata["k"] = "v"
    return task.SerializeToString()


# -- decoders: decode or raise CorruptDataError, never anything else ------------------------------
_msgpack_objects = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=8)
    | st.text(max_size=8) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.binary(max_size=4) | st.integers(0, 9), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
_field_values = st.one_of(
    st.binary(max_size=48),
    st.sampled_from([b"1", b"2", b"0", b"-1", b"9" * 5000, b"closed", GOOD_EVENT]),
    st.builds(lambda n: GOOD_EVENT[:n], st.integers(0, len(GOOD_EVENT))),
)
_fields = st.dictionaries(
    st.sampled_from([b"f", b"v", b"e", b"k", b"o"]) | st.binary(max_size=3), _field_values
)


@settings(max_examples=500, deadline=None)
@given(fields=_fields)
def test_decode_event_and_decode_rows_never_crash(fields: dict[bytes, bytes]) -> None:
    try:
        decode_event("k", fields)
    except CorruptDataError as e:
        assert e.key == "k"
    (entry,) = decode_rows("k", [(b"5-1", fields)])
    assert entry.position == (5, 1)
    assert (entry.error is None) or (entry.event is None and entry.error.key == "k")
    if entry.error is not None:
        assert "stream entry 5-1" in str(entry.error)


@settings(max_examples=300, deadline=None)
@given(
    payload=st.one_of(
        st.binary(max_size=64), st.builds(lambda n: rich_task()[:n], st.integers(0, 200))
    ),
    schema=st.sampled_from([b"1", b"2", b"x", b"9" * 5000, None]),
)
def test_decode_task_never_crashes(payload: bytes, schema: bytes | None) -> None:
    try:
        assert decode_task("k", "t", schema, payload).id == "t"
    except CorruptDataError as e:
        assert e.key == "k"


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.none() | _field_values | st.just(b"\xff\xfe"), min_size=8, max_size=8))
def test_decode_head_never_crashes(values: list[bytes | None]) -> None:
    try:
        decode_head("k", values)
    except CorruptDataError as e:
        assert e.key == "k"


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=40) | st.builds(msgpack.packb, _msgpack_objects))
def test_decode_locator_never_crashes(raw: bytes) -> None:
    try:
        decode_locator("k", raw)
    except CorruptDataError as e:
        assert e.key == "k"


_ids = st.sampled_from([b"0-0", b"1-1", b"1x-1", b"-1", b"9" * 30 + b"-1", b"", b"1-"])


@settings(max_examples=500, deadline=None)
@given(
    data=st.binary(max_size=64)
    | st.builds(
        lambda a, b, obj: a + b" " + b + b"\n" + msgpack.packb(obj), _ids, _ids, _msgpack_objects
    )
    | st.builds(lambda a, rest: a + b"\n" + rest, _ids, st.binary(max_size=16))
)
def test_unpack_wake_takes_only_well_formed_wake_ups(data: bytes) -> None:
    carried = unpack_wake(data)
    if carried is not None:
        prev, entry_id, fields = carried
        assert all(x.count(b"-") == 1 and x.replace(b"-", b"").isdigit() for x in (prev, entry_id))
        assert all(type(k) is bytes and type(v) is bytes for k, v in fields.items())


@settings(max_examples=300, deadline=None)
@given(member=st.binary(max_size=40))
def test_index_member_decoders_never_crash(member: bytes) -> None:
    try:
        member_cursor("k", member)
        member_task_id("k", member)
    except CorruptDataError as e:
        assert e.key == "k"


# -- task records ------------------------------------------------------------------------------
@pytest.fixture
def store(redis: aioredis.Redis, prefix: str) -> VersionedRedisTaskStore:
    return VersionedRedisTaskStore(redis, prefix=prefix, terminal_ttl=600)


async def test_every_truncation_of_a_task_payload_is_a_typed_error_or_the_same_task(
    store: VersionedRedisTaskStore, redis: aioredis.Redis
) -> None:
    """A cut inside a field fails to parse; a cut between fields parses (protobuf has no
    length framing): either way the caller gets a typed error or a Task with the right id."""
    payload = rich_task()
    await store.save(make_task("t"), prev_version=MISSING, context=ctx())
    outcomes = set()
    for cut in range(len(payload)):
        await redis.hset(store.keys.task("t"), b"d", payload[:cut])
        try:
            stored = await store.get("t", ctx())
            assert stored is not None and stored.task.id == "t"
            outcomes.add("task")
        except CorruptDataError as e:
            assert e.key == store.keys.task("t")
            outcomes.add("error")
    assert outcomes == {"task", "error"}


@pytest.mark.parametrize(
    ("field", "value", "get_sees"),
    [
        (b"o", b"\xff\xfe", CorruptDataError),  # undecodable, not "another owner's"
        (b"c", b"\xff\xfe", "task"),  # the context id is read from the payload by get
        (b"v", b"9" * 5000, CorruptDataError),  # int() refuses over 4,300 digits
        (b"f", b"9" * 5000, CorruptDataError),  # not a newer schema: garbage
        (b"x", b"9" * 5000, "task"),
    ],
    ids=["owner-not-utf8", "context-not-utf8", "huge-version", "huge-schema", "huge-expiry"],
)
async def test_record_fields_that_crash_a_naive_decoder_are_typed_errors(
    store: VersionedRedisTaskStore, redis: aioredis.Redis, field: bytes, value: bytes, get_sees
) -> None:
    await store.save(make_task("fine"), prev_version=MISSING, context=ctx())
    v = await store.save(make_task("t"), prev_version=MISSING, context=ctx())
    key = store.keys.task("t")
    await redis.hset(key, field, value)
    if get_sees is CorruptDataError:
        with pytest.raises(CorruptDataError) as info:
            await store.get("t", ctx())
        assert info.value.key == key
    else:
        stored = await store.get("t", ctx())
        assert (stored is None) if get_sees is None else (stored is not None)
    for write in (
        store.save(make_task("t", state=S.TASK_STATE_WORKING), prev_version=v, context=ctx()),
        store.delete("t", ctx()),
    ):
        with pytest.raises(CorruptDataError) as info:
            await write
        assert info.value.key == key
    assert await redis.hget(key, field) == value  # refused: nothing was written
    stored = await store.get("fine", ctx())
    assert stored is not None and stored.version == TaskVersion(1)


@pytest.mark.parametrize("caller", ["alice", "mallory"], ids=["its-owner", "another-owner"])
async def test_garbage_in_every_field_is_corrupt_data_to_any_caller(
    store: VersionedRedisTaskStore, redis: aioredis.Redis, caller: str
) -> None:
    """The schema and shape are checked before the owner: corruption never looks like
    "another owner's task" (None), and the error shows none of the record's bytes."""
    await store.save(make_task("t"), prev_version=MISSING, context=ctx())
    key = store.keys.task("t")
    fields = await redis.hkeys(key)
    await redis.hset(key, mapping={f: SECRET for f in fields})
    with pytest.raises(CorruptDataError) as info:
        await store.get("t", ctx(caller))
    assert info.value.key == key
    assert SECRET.decode() not in str(info.value)


# -- wrong key types ---------------------------------------------------------------------------
_PLANT = {
    "string": lambda r, k: r.set(k, SECRET),
    "list": lambda r, k: r.rpush(k, SECRET),
    "hash": lambda r, k: r.hset(k, b"x", SECRET),
}


@pytest.mark.parametrize("planted", ["string", "list", "hash"])
@pytest.mark.parametrize(
    "which", ["events", "all", "ctx", "st-old", "st-new", "ctxst-new", "expiring"]
)
async def test_a_write_meeting_a_wrong_typed_key_names_it_and_writes_nothing(
    store: VersionedRedisTaskStore,
    redis: aioredis.Redis,
    which: str,
    planted: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys, done = store.keys, S.TASK_STATE_COMPLETED
    task = make_task("t", context_id="c", state=S.TASK_STATE_WORKING, ts_ns=1)
    v = await store.save(task, event=task, prev_version=MISSING, context=ctx())
    await store.save(make_task("n", context_id="c"), prev_version=MISSING, context=ctx())
    key = {
        "events": keys.events("t"),
        "all": keys.index("alice"),
        "ctx": keys.index("alice", "c"),
        "st-old": keys.index("alice", state=S.TASK_STATE_WORKING),
        "st-new": keys.index("alice", state=done),
        "ctxst-new": keys.index("alice", "c", done),
        "expiring": keys.expiring("alice"),
    }[which]
    saved = await redis.dump(key)
    await redis.delete(key)
    await _PLANT[planted](redis, key)
    before = {k: await redis.dump(k) for k in await _keys(redis, keys)}
    final = make_task("t", context_id="c", state=done, ts_ns=2)  # every index entry moves
    if is_cluster(redis) and which != "events":
        # On a cluster the owner's indexes live in another slot, updated after the task's
        # commit (task_index.py): the save stands, the index update fails naming the key.
        with caplog.at_level("WARNING", logger="a2a_redis"):
            assert await store.save(final, event=final, prev_version=v, context=ctx())
        assert any(key in r.getMessage() for r in caplog.records)
        assert await redis.dump(key) == before[key.encode()]  # that key untouched
        return
    with pytest.raises(CorruptDataError) as info:
        await store.save(final, event=final, prev_version=v, context=ctx())
    assert info.value.key == key and key in str(info.value)
    after = {k: await redis.dump(k) for k in await _keys(redis, keys)}
    assert after == before  # nothing written, not even before the bad key was reached
    await redis.delete(key)  # the operator repairs the key: the same write goes through
    if saved is not None:
        await redis.restore(key, 0, saved)
    assert await store.save(final, event=final, prev_version=v, context=ctx()) == TaskVersion(2)
    page = await store.list(ListTasksRequest(context_id="c"), ctx())
    assert [t.id for t in page.tasks] == ["t", "n"]


async def _keys(redis: aioredis.Redis, keys) -> list[bytes]:
    return sorted([k async for k in redis.scan_iter(match=keys.scan_pattern())])


async def test_reads_meeting_wrong_typed_keys_name_them(
    redis: aioredis.Redis, prefix: str, store: VersionedRedisTaskStore
) -> None:
    keys = store.keys
    await store.save(make_task("fine"), prev_version=MISSING, context=ctx())
    stream = RedisTaskEventStream(redis, task_store=store)
    owner, remote = (RedisQueueManager(redis, prefix=prefix) for _ in range(2))
    try:
        await redis.set(keys.events("t"), SECRET)
        for call in (
            _first(stream.subscribe("t", after=MISSING)),
            stream.publish("t", VersionedEvent(numbered(1, "t"), TaskVersion(1))),
        ):
            with pytest.raises(CorruptDataError) as info:
                await asyncio.wait_for(call, GUARD)
            assert info.value.key == keys.events("t")
        queue = await owner.create_or_tap("t")  # the lease is fine: only appends fail
        with pytest.raises(CorruptDataError) as info:
            await queue.enqueue_event(numbered(1, "t"))
        assert info.value.key == keys.events("t")
        await redis.delete(keys.lease("q"))
        await redis.hset(keys.lease("q"), b"x", SECRET)
        with pytest.raises(CorruptDataError) as info:
            await remote.tap("q")
        assert info.value.key == keys.lease("q")
        await owner.create_or_tap("q")  # taking the lease overwrites what lay there
        assert await remote.tap("q") is not None
        await redis.rpush(keys.push_configs("p"), SECRET)  # push configs share a task's life
        task = make_task("p", state=S.TASK_STATE_COMPLETED)
        await store.save(task, prev_version=MISSING, context=ctx())  # PEXPIREAT: any type
        await store.delete("p", ctx())
        assert await redis.exists(keys.push_configs("p"), keys.task("p")) == 0
        stored = await store.get("fine", ctx())
        assert stored is not None and stored.version == TaskVersion(1)  # untouched
    finally:
        await owner.aclose()
        await remote.aclose()
        await stream.aclose()


async def _first(gen: AsyncGenerator[VersionedEvent, None]) -> VersionedEvent:
    try:
        return await anext(gen)
    finally:
        await gen.aclose()


# -- garbage ListTasks index members -----------------------------------------------------------
@pytest.mark.parametrize(
    "member",
    [b"short", b"\x01" + bytes(16) + b"\xff\xfe", b"\x00" + bytes(16) + b"x" * 1100],
    ids=["too-short", "id-not-utf8", "over-long-id"],
)
async def test_a_garbage_index_member_fails_list_naming_the_index(
    store: VersionedRedisTaskStore, redis: aioredis.Redis, member: bytes
) -> None:
    await store.save(make_task("t"), prev_version=MISSING, context=ctx())
    await store.save(make_task("b"), prev_version=MISSING, context=ctx("bob"))
    index = store.keys.index("alice")
    await redis.zadd(index, {member: 0})
    with pytest.raises(CorruptDataError) as info:
        await store.list(ListTasksRequest(), ctx())
    assert info.value.key == index
    assert [t.id for t in (await store.list(ListTasksRequest(), ctx("bob"))).tasks] == ["b"]
    await redis.zrem(index, member)  # the documented repair
    assert [t.id for t in (await store.list(ListTasksRequest(), ctx())).tasks] == ["t"]


async def test_an_undecodable_expiry_entry_with_an_over_long_id_is_dropped(
    store: VersionedRedisTaskStore, redis: aioredis.Redis
) -> None:
    from a2a_redis.log.codec import encode_locator

    bad = encode_locator("c" * 2000, 3, b"\x00" + bytes(16) + b"x" * 2000)
    await redis.zadd(store.keys.expiring("alice"), {bad: 1})  # due
    await store.save(make_task("t"), prev_version=MISSING, context=ctx())
    assert (await store.list(ListTasksRequest(), ctx())).total_size == 1
    assert await redis.zscore(store.keys.expiring("alice"), bad) is None
