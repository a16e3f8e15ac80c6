"""Hostile ids and oversized payloads (property-based): no key escapes, no collision, no crash.

What the API can carry, and so what is generated:

* Task ids and context ids inside a ``Task`` (and every other protobuf string) must be valid
  UTF-8: protobuf refuses a lone surrogate when the message is built, and a stored payload
  with invalid UTF-8 fails to parse (tests/reliability/test_corrupt_data.py). They are drawn
  from every Unicode character but the surrogates, plus braces, colons, glob characters,
  ``%``, NUL and CR/LF.
* Ids passed as Python ``str`` arguments (``get``, ``delete``, ``subscribe``, ``publish``,
  ``tap``, the push-config calls) and owners (``User.user_name``) can carry lone surrogates:
  they are drawn from every code point.
* Ids longer than ``keys.MAX_ID_BYTES`` UTF-8 bytes (up to 1 MiB) are refused with
  ``InvalidIdError`` by every call that would build a key from them (here as a property;
  1 MiB ids and oversized payloads in tests/reliability/test_size_limits.py).

The key properties are checked on ``Keys`` itself (every key parses back to its prefix and
ids, which proves both containment and injectivity), then through every component on every
backend (every key found under the test's prefix is one ``Keys`` built for the ids used),
and on a private server, where the whole keyspace is scanned.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.server.events.event_queue import EventQueueLegacy, QueueShutDown
from a2a.types.a2a_pb2 import (
    ListTasksRequest,
    Message,
    Part,
    Role,
    TaskPushNotificationConfig,
    TaskState,
    TaskStatusUpdateEvent,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from a2a_redis import (
    A2ARedisError,
    InvalidIdError,
    RedisBackend,
    RedisPushNotificationConfigStore,
    RedisQueueManager,
    RedisTaskEventStream,
    VersionedRedisTaskStore,
)
from a2a_redis.log.keys import MAX_ID_BYTES, Keys
from a2a_redis.ops.embedded import EmbeddedServer
from tests.helpers import ctx, make_task, push_config_field

MISSING = TaskVersion.MISSING
WORKING = TaskState.TASK_STATE_WORKING
GUARD = 30  # seconds: a hang guard only
MIB = 1 << 20

_SPECIAL = st.sampled_from([*"{}:*?[]\\%#/ .-_\x00\r\n", "🙂", "é", "\ue000"])
# Protobuf strings: valid UTF-8 only. Python str arguments and owners: any code point.
proto_ids = st.text(st.one_of(_SPECIAL, st.characters(codec="utf-8")), max_size=16)
any_ids = st.text(st.one_of(_SPECIAL, st.characters(exclude_categories=())), max_size=16)
# Around and far beyond the limit, in 1- to 4-byte characters and lone surrogates.
long_ids = st.builds(
    lambda ch, n: ch * n,
    st.sampled_from(["x", "é", "\u2603", "🙂", "\ud800", ":"]),
    st.one_of(st.integers(250, 1100), st.just(20_000)),  # 1 MiB: test_size_limits.py
)
PROPERTY = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_EXAMPLE = itertools.count()


def nbytes(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass"))


def too_long(*values: str) -> bool:
    return any(nbytes(v) > MAX_ID_BYTES for v in values)


def decode_part(part: str) -> str:
    """Invert ``encode_id`` (percent-decoding of the UTF-8 "surrogatepass" bytes)."""
    raw, i = bytearray(), 0
    while i < len(part):
        if part[i] == "%":
            raw.append(int(part[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(part[i]))
            i += 1
    return raw.decode("utf-8", "surrogatepass")


PART = r"([A-Za-z0-9._%-]*)"  # what an encoded id may contain: no brace, colon or glob


def parse_task_key(prefix: str, key: str) -> tuple[str, str]:
    """(task id, kind) of a task key; fails unless the key has exactly that shape."""
    m = re.fullmatch(re.escape(prefix) + r":\{t:" + PART + r"\}:(task|events|lease|push|wake)", key)
    assert m is not None, key
    return decode_part(m.group(1)), m.group(2)


def parse_owner_key(prefix: str, key: str) -> tuple[str, str, int, str]:
    """(owner, context id, state, kind) of an owner key; fails unless it has that shape."""
    m = re.fullmatch(
        re.escape(prefix)
        + r":\{o:"
        + PART
        + r"\}:(?:(all|expiring)|(ctx):"
        + PART
        + r"|(st):([0-9]+)|(ctxst):"
        + PART
        + r":([0-9]+))",
        key,
    )
    assert m is not None, key
    owner = decode_part(m.group(1))
    if m.group(2):
        return owner, "", 0, m.group(2)
    if m.group(3):
        return owner, decode_part(m.group(4)), 0, "ctx"
    if m.group(5):
        return owner, "", int(m.group(6)), "st"
    return owner, decode_part(m.group(8)), int(m.group(9)), "ctxst"


# -- Keys, directly --------------------------------------------------------------------------
@settings(max_examples=500, deadline=None)
@given(task_id=any_ids)
def test_every_task_key_is_the_prefix_and_exactly_the_encoded_id(task_id: str) -> None:
    keys = Keys("p:q")
    for kind in ("task", "events", "lease", "push", "wake"):
        assert parse_task_key("p:q", getattr(keys, kind if kind != "push" else "push_configs")(
            task_id
        )) == (task_id, kind)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(owner=any_ids, context_id=any_ids, state=st.integers(0, 2**31 - 1))
def test_every_owner_key_is_the_prefix_and_exactly_the_encoded_ids(
    owner: str, context_id: str, state: int
) -> None:
    keys = Keys("p")
    owner_, context_, state_, _ = parse_owner_key("p", keys.index(owner, context_id, state))
    assert (owner_, context_, state_) == (owner, context_id, state)
    for key in keys.indexes(owner, context_id, state):
        assert parse_owner_key("p", key)[0] == owner
    assert parse_owner_key("p", keys.expiring(owner)) == (owner, "", 0, "expiring")


@settings(max_examples=500, deadline=None)
@given(a=any_ids, b=any_ids, ca=any_ids, cb=any_ids, sa=st.integers(0, 9), sb=st.integers(0, 9))
def test_distinct_ids_never_share_a_key(a: str, b: str, ca: str, cb: str, sa: int, sb: int) -> None:
    keys = Keys("p")

    def task_keys(t: str) -> set[str]:
        return {keys.task(t), keys.events(t), keys.lease(t), keys.push_configs(t), keys.wake(t)}

    if a != b:
        assert not task_keys(a) & task_keys(b)
        assert keys.expiring(a) != keys.expiring(b)
    assert not task_keys(a) & {keys.index(a), keys.expiring(a)}  # tasks and owners apart
    if (a, ca, sa) != (b, cb, sb) and (ca or sa or cb or sb):
        assert keys.index(a, ca, sa) != keys.index(b, cb, sb)
    if (a, ca) != (b, cb):  # push-config fields: one per (owner, config id)
        assert push_config_field(a, ca) != push_config_field(b, cb)
        assert b"#seq" not in (push_config_field(a, ca), push_config_field(b, cb))


@settings(max_examples=200, deadline=None)
@given(value=long_ids)
def test_an_id_over_the_limit_is_refused_by_every_key(value: str) -> None:
    keys = Keys("p")
    builders = [
        keys.task, keys.events, keys.lease, keys.push_configs, keys.wake, keys.expiring,
        keys.index, lambda v: keys.index("o", v), lambda v: keys.index("o", v, 3),
    ]  # fmt: skip
    for build in builders:
        if not too_long(value):
            assert build(value).startswith("p:{")
            continue
        with pytest.raises(InvalidIdError) as info:
            build(value)
        assert isinstance(info.value, ValueError) and isinstance(info.value, A2ARedisError)
        assert info.value.key is not None and info.value.key.startswith("p:{")
        assert len(str(info.value)) < 200  # names the key, never echoes the id
        assert f"over the {MAX_ID_BYTES}-byte limit" in str(info.value)


@pytest.mark.parametrize("char", ["x", "é", "\u2603", "🙂", "\ud800"])
def test_the_limit_is_exactly_max_id_bytes(char: str) -> None:
    longest = char * (MAX_ID_BYTES // nbytes(char))
    keys = Keys("p")
    assert parse_task_key("p", keys.task(longest)) == (longest, "task")
    with pytest.raises(InvalidIdError):
        keys.task(longest + "x" * (MAX_ID_BYTES - nbytes(longest) + 1))


# -- every component ---------------------------------------------------------------------------
class Components:
    """Every component on one client, in one namespace (two queue managers: two replicas)."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.prefix = prefix
        self.store = VersionedRedisTaskStore(client, prefix=prefix)
        self.stream = RedisTaskEventStream(client, task_store=self.store)
        self.owner_qm = RedisQueueManager(client, prefix=prefix)
        self.remote_qm = RedisQueueManager(client, prefix=prefix)
        self.push = RedisPushNotificationConfigStore(client, prefix=prefix)

    async def aclose(self) -> None:
        for closer in (self.stream, self.owner_qm, self.remote_qm):
            await closer.aclose()


async def first_event(components: Components, task_id: str, after: TaskVersion) -> VersionedEvent:
    gen = components.stream.subscribe(task_id, after=after)
    try:
        return await asyncio.wait_for(anext(gen), GUARD)
    finally:
        await gen.aclose()


async def exercise(c: Components, task_ids: list[str], context_id: str, owner: str) -> set[str]:
    """Drive every call with these ids; return every key that may legitimately exist."""
    keys, who = c.store.keys, ctx(owner)
    expected: set[str] = {keys.expiring(owner), *keys.indexes(owner, context_id, WORKING)}
    versions = {}
    for task_id in task_ids:
        expected |= {keys.task(task_id), keys.events(task_id), keys.push_configs(task_id)}
        expected |= {keys.lease(task_id), *keys.indexes(owner, context_id, 1)}
        task = make_task(task_id, context_id=context_id)
        versions[task_id] = await c.store.save(task, event=task, prev_version=MISSING, context=who)
    # Live subscribers of every task at once: each sees its own task's event, nothing else.
    listeners = {
        t: asyncio.create_task(first_event(c, t, versions[t])) for t in task_ids
    }  # fmt: skip
    while c.stream.listener.stats()["subscribers"] < len(task_ids):
        await asyncio.sleep(0.005)  # bounded by the test timeout
    for task_id in task_ids:
        event = TaskStatusUpdateEvent(task_id=task_id, context_id=context_id)
        event.status.state = WORKING
        task = make_task(task_id, context_id=context_id, state=WORKING)
        v = await c.store.save(task, event=event, prev_version=versions[task_id], context=who)
        await c.stream.publish(task_id, VersionedEvent(event, v))
    for task_id, listener in listeners.items():
        got = await listener
        assert got.event.task_id == task_id and got.version == TaskVersion(2)
    for task_id in task_ids:
        stored = await c.store.get(task_id, who)
        assert stored is not None and stored.task.id == task_id
        assert await c.store.as_task_store.get(task_id, who) == stored.task
    page = await c.store.list(ListTasksRequest(context_id=context_id), who)
    assert sorted(t.id for t in page.tasks) == sorted(task_ids)
    assert page.total_size == len(task_ids)
    for task_id in task_ids:
        config = TaskPushNotificationConfig(id=task_id[::-1], url="https://example.com/hook")
        saved = await c.push.set_info(task_id, config, who)
        assert await c.push.get_info(task_id, who) == [saved]
        assert await c.push.get_info_for_dispatch(task_id) == [saved]
        await queue_round_trip(c, task_id)
    # The replicas' own bookkeeping (leases.py): their heartbeats and task sets.
    expected.add(keys.replicas)
    expected |= {keys.replica_tasks(x.leases.replica) for x in (c.stream, c.owner_qm, c.remote_qm)}
    return expected


async def queue_round_trip(c: Components, task_id: str) -> None:
    """Owner queue on one manager, remote tap on the other: the event crosses, then closes."""
    queue = await c.owner_qm.create_or_tap(task_id)
    tap = await c.remote_qm.tap(task_id)
    assert isinstance(tap, EventQueueLegacy)
    message = Message(message_id="m", role=Role.ROLE_AGENT, parts=[Part(text="hi")])
    await queue.enqueue_event(message)
    assert await asyncio.wait_for(tap.dequeue_event(), GUARD) == message
    assert await queue.dequeue_event() == message  # the local consumer, as the SDK's
    queue.task_done()
    await asyncio.wait_for(c.owner_qm.close(task_id), GUARD)
    with pytest.raises(QueueShutDown):
        await asyncio.wait_for(tap.dequeue_event(), GUARD)


async def scan(client: aioredis.Redis, match: str) -> set[str]:
    return {k.decode() async for k in client.scan_iter(match=match, count=1000)}


@PROPERTY
@given(
    task_ids=st.lists(proto_ids, min_size=2, max_size=3, unique=True),
    context_id=proto_ids,
    owner=any_ids,
)
async def test_hostile_ids_through_every_component_stay_in_their_keys(
    redis: aioredis.Redis, prefix: str, task_ids: list[str], context_id: str, owner: str
) -> None:
    sub = f"{prefix}:{next(_EXAMPLE)}"
    c = Components(redis, sub)
    try:
        expected = await exercise(c, task_ids, context_id, owner)
        found = await scan(redis, Keys(sub).scan_pattern())
        assert found <= expected, found - expected
        assert {c.store.keys.task(t) for t in task_ids} <= found
        for task_id in task_ids:
            await c.store.delete(task_id, ctx(owner))
        await c.aclose()
        # What is left is replicas' bookkeeping: a replica that closed while it held leases
        # leaves its task set for a survivor's sweep, which forgets it (the tasks are gone).
        left = await scan(redis, Keys(sub).scan_pattern())
        keys = Keys(sub)
        assert all(k == keys.replicas or k.endswith("}:tasks") for k in left), left
        survivor = RedisBackend(redis, prefix=sub)
        try:
            for _ in range(8):  # a sweep handles each dead replica; then forgets it
                await survivor.control.reaper.sweep()
        finally:
            await survivor.aclose()
        assert await scan(redis, Keys(sub).scan_pattern()) == set()  # deleted: nothing left
    finally:
        await c.aclose()


@pytest.fixture(scope="module")
def private_url() -> Iterator[str]:
    """A server of this module's own: its whole keyspace may be scanned."""
    with EmbeddedServer() as server:
        yield server.url


@PROPERTY
@given(
    task_ids=st.lists(proto_ids, min_size=2, max_size=3, unique=True),
    context_id=proto_ids,
    owner=any_ids,
)
async def test_no_key_lands_outside_the_prefix_on_a_private_server(
    private_url: str, task_ids: list[str], context_id: str, owner: str
) -> None:
    client = aioredis.Redis.from_url(private_url)
    sub = f"hostile:{next(_EXAMPLE)}"
    c = Components(client, sub)
    try:
        expected = await exercise(c, task_ids, context_id, owner)
        everything = await scan(client, "*")  # nothing else uses this server
        assert everything <= expected, everything - expected
        assert all(k.startswith(sub + ":{") or k == sub + ":replicas" for k in everything)
    finally:
        await c.aclose()
        left = await scan(client, f"{sub}:*")  # delete by prefix, as everywhere
        if left:
            await client.unlink(*left)
        await client.aclose()


# -- no crash: a typed error exactly where documented --------------------------------------------
async def outcome(call: object) -> str:
    """ "ok", or the name of the A2ARedisError raised (anything else fails the test)."""
    try:
        await call  # type: ignore[misc]
    except A2ARedisError as e:
        assert e.key is not None
        return type(e).__name__
    return "ok"


@PROPERTY
@given(
    task_id=st.one_of(any_ids, long_ids),
    proto_task_id=st.one_of(proto_ids, long_ids.filter(lambda s: "\ud800" not in s)),
    context_id=st.one_of(proto_ids, long_ids.filter(lambda s: "\ud800" not in s)),
    owner=st.one_of(any_ids, long_ids),
)
async def test_every_call_works_or_raises_the_documented_typed_error(
    redis: aioredis.Redis,
    prefix: str,
    task_id: str,
    proto_task_id: str,
    context_id: str,
    owner: str,
) -> None:
    c = Components(redis, f"{prefix}:{next(_EXAMPLE)}")
    who = ctx(owner)
    bad_task, bad_save = too_long(task_id), too_long(proto_task_id, context_id, owner)
    surrogate = any(0xD800 <= ord(ch) <= 0xDFFF for ch in task_id)
    config = TaskPushNotificationConfig(id="c", url="https://example.com/hook")
    event = TaskStatusUpdateEvent(task_id="x")
    try:
        task = make_task(proto_task_id, context_id=context_id)
        expect = {
            c.store.save(task, prev_version=MISSING, context=who): bad_save,
            c.store.get(task_id, who): bad_task or too_long(owner),
            c.store.delete(task_id, who): bad_task or too_long(owner),
            c.store.list(ListTasksRequest(context_id=context_id), who): too_long(owner, context_id),
            c.stream.publish(task_id, VersionedEvent(event, TaskVersion(1))): bad_task,
            first_event(c, task_id, MISSING): bad_task,
            c.remote_qm.tap(task_id): bad_task,
            c.push.set_info(task_id, config, who): bad_task or too_long(owner) or surrogate,
            c.push.get_info(task_id, who): bad_task or too_long(owner),
            c.push.get_info_for_dispatch(task_id): bad_task,
            c.push.delete_info(task_id, who): bad_task or too_long(owner),
            c.push.delete_info(task_id, who, "c"): bad_task or too_long(owner),
        }
        for call, refused in expect.items():
            assert await outcome(call) == ("InvalidIdError" if refused else "ok")
        queue = await outcome(c.owner_qm.create_or_tap(task_id))
        assert queue == ("InvalidIdError" if bad_task else "ok")
        if queue == "ok":
            await asyncio.wait_for(c.owner_qm.close(task_id), GUARD)  # nothing to drain
    finally:
        await c.aclose()
