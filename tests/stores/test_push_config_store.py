"""``RedisPushNotificationConfigStore``: contract, owner scoping, order, encryption, faults.

Every test runs on the real servers and on fakeredis (the ``redis`` fixture). The
differential test compares the store with the SDK's ``InMemoryPushNotificationConfigStore``
on Hypothesis-generated operation sequences over several owners, tasks and config ids.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

import msgpack
import pytest
import redis.asyncio as aioredis
from a2a.server.tasks import InMemoryPushNotificationConfigStore
from a2a.types.a2a_pb2 import AuthenticationInfo, TaskPushNotificationConfig
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from a2a_redis.errors import (
    A2ARedisError,
    CorruptDataError,
    RedisUnavailableError,
    UnsupportedSchemaError,
)
from a2a_redis.log.keys import Keys
from a2a_redis.stores.push_config_store import DecryptionError, RedisPushNotificationConfigStore
from tests.helpers import ctx, push_config_field

URL = "https://hooks.example.com/secret-path-7f3a"
TOKEN = "tok-5e1b-very-secret"
CREDENTIALS = "Bearer cred-9c4d-top-secret"


def cfg(config_id: str = "", *, url: str = URL, task_id: str = "") -> TaskPushNotificationConfig:
    return TaskPushNotificationConfig(
        id=config_id,
        task_id=task_id,
        url=url,
        token=TOKEN,
        authentication=AuthenticationInfo(scheme="Bearer", credentials=CREDENTIALS),
    )


def ids(configs: list[TaskPushNotificationConfig]) -> list[str]:
    return [c.id for c in configs]


@pytest.fixture
def store(redis: aioredis.Redis, prefix: str) -> RedisPushNotificationConfigStore:
    return RedisPushNotificationConfigStore(redis, prefix=prefix)


# -- normalisation -----------------------------------------------------------------------------
async def test_set_normalizes_a_copy_and_never_mutates_the_argument(store):
    arg = cfg("", task_id="some-other-task")
    before = arg.SerializeToString(deterministic=True)
    stored = await store.set_info("t1", arg, ctx("alice"))
    assert arg.SerializeToString(deterministic=True) == before
    assert stored is not arg
    assert stored.id == "t1"  # empty id defaults to the task id
    assert stored.task_id == "t1"
    assert stored.url == URL and stored.token == TOKEN
    assert stored.authentication.credentials == CREDENTIALS
    assert await store.get_info("t1", ctx("alice")) == [stored]
    stored.url = "https://changed.example.com"  # the returned copy is the caller's
    assert (await store.get_info("t1", ctx("alice")))[0].url == URL


async def test_task_id_is_set_when_an_id_is_given(store):
    stored = await store.set_info("t1", cfg("c1"), ctx())
    assert (stored.id, stored.task_id) == ("c1", "t1")


# -- several configs, replace, delete ----------------------------------------------------------
async def test_several_configs_per_task_in_last_set_order(store):
    for i in ("b", "a", "c"):
        await store.set_info("t", cfg(i, url=f"https://h/{i}"), ctx())
    assert ids(await store.get_info("t", ctx())) == ["b", "a", "c"]
    # Setting an existing id replaces it and moves it last (as the in-memory store does).
    await store.set_info("t", cfg("b", url="https://h/b2"), ctx())
    got = await store.get_info("t", ctx())
    assert ids(got) == ["a", "c", "b"]
    assert got[-1].url == "https://h/b2"
    assert await store.get_info("other-task", ctx()) == []


async def test_ids_stay_distinct_after_a_delete(store):
    """The PyPI package's bug: create 3, delete the 2nd, create another: all distinct."""
    for i in ("c1", "c2", "c3"):
        await store.set_info("t", cfg(i), ctx())
    await store.delete_info("t", ctx(), "c2")
    await store.set_info("t", cfg("c4"), ctx())
    got = await store.get_info("t", ctx())
    assert ids(got) == ["c1", "c3", "c4"]
    assert len({c.id for c in got}) == 3
    # A config with no id takes the task id and coexists with the others.
    await store.set_info("t", cfg(""), ctx())
    assert ids(await store.get_info("t", ctx())) == ["c1", "c3", "c4", "t"]


async def test_delete_one_all_and_absent(store, redis, prefix):
    for i in ("a", "b", "c"):
        await store.set_info("t", cfg(i), ctx())
    await store.delete_info("t", ctx(), "b")
    assert ids(await store.get_info("t", ctx())) == ["a", "c"]
    await store.delete_info("t", ctx(), "b")  # absent: no-op
    await store.delete_info("t", ctx(), "nope")
    await store.delete_info("no-such-task", ctx(), "a")
    await store.delete_info("no-such-task", ctx())
    await store.delete_info("t", ctx())
    assert await store.get_info("t", ctx()) == []
    assert await redis.exists(Keys(prefix).push_configs("t")) == 0  # no leftover counter
    await store.delete_info("t", ctx())


# -- owner scoping ------------------------------------------------------------------------------
async def test_owners_are_scoped_and_ids_never_collide_across_owners(store):
    a = await store.set_info("t", cfg("x", url="https://h/alice"), ctx("alice"))
    b = await store.set_info("t", cfg("x", url="https://h/bob"), ctx("bob"))
    await store.set_info("t", cfg("y", url="https://h/bob-y"), ctx("bob"))
    assert await store.get_info("t", ctx("alice")) == [a]
    assert ids(await store.get_info("t", ctx("bob"))) == ["x", "y"]
    assert await store.get_info("t", ctx("carol")) == []
    # Deleting "x" as alice leaves bob's "x"; deleting all as carol touches nothing.
    await store.delete_info("t", ctx("carol"))
    await store.delete_info("t", ctx("carol"), "x")
    await store.delete_info("t", ctx("alice"), "x")
    assert await store.get_info("t", ctx("alice")) == []
    assert (await store.get_info("t", ctx("bob")))[0] == b
    await store.set_info("t", cfg("x"), ctx("alice"))
    await store.delete_info("t", ctx("bob"))
    assert ids(await store.get_info("t", ctx("alice"))) == ["x"]
    assert await store.get_info("t", ctx("bob")) == []


async def test_owner_and_id_separators_cannot_collide(store):
    """Owner "a" with id "b:c" and owner "a:b" with id "c" are different entries."""
    await store.set_info("t", cfg("b:c", url="https://h/1"), ctx("a"))
    await store.set_info("t", cfg("c", url="https://h/2"), ctx("a:b"))
    await store.set_info("t", cfg("", url="https://h/3"), ctx(""))  # the empty owner
    assert [c.url for c in await store.get_info("t", ctx("a"))] == ["https://h/1"]
    assert [c.url for c in await store.get_info("t", ctx("a:b"))] == ["https://h/2"]
    assert [c.url for c in await store.get_info("t", ctx(""))] == ["https://h/3"]
    await store.delete_info("t", ctx("a"))
    assert len(await store.get_info_for_dispatch("t")) == 2


async def test_dispatch_sees_every_owner_in_last_set_order(store):
    await store.set_info("t", cfg("x"), ctx("alice"))
    await store.set_info("t", cfg("x"), ctx("bob"))
    await store.set_info("t", cfg("y"), ctx("alice"))
    await store.set_info("other", cfg("z"), ctx("alice"))
    got = await store.get_info_for_dispatch("t")
    assert ids(got) == ["x", "x", "y"]
    assert all(c.task_id == "t" for c in got)
    assert await store.get_info_for_dispatch("none") == []


# -- differential test against the SDK's in-memory store ----------------------------------------
OWNERS = ("", "alice", "b:{o}*", "ü")
TASKS = ("t1", "t:2")
CONFIG_IDS = ("", "a", "b", "a:b", "%41", "t1", "ü")


@dataclass(frozen=True)
class Op:
    kind: str  # set | get | dispatch | delete
    owner: str = ""
    task: str = ""
    config_id: str | None = None
    url: str = ""


ops_strategy = st.lists(
    st.one_of(
        st.builds(
            Op,
            kind=st.just("set"),
            owner=st.sampled_from(OWNERS),
            task=st.sampled_from(TASKS),
            config_id=st.sampled_from(CONFIG_IDS),
            url=st.sampled_from(("https://h/1", "https://h/2")),
        ),
        st.builds(
            Op, kind=st.just("get"), owner=st.sampled_from(OWNERS), task=st.sampled_from(TASKS)
        ),
        st.builds(Op, kind=st.just("dispatch"), task=st.sampled_from(TASKS)),
        st.builds(
            Op,
            kind=st.just("delete"),
            owner=st.sampled_from(OWNERS),
            task=st.sampled_from(TASKS),
            config_id=st.none() | st.sampled_from(CONFIG_IDS),
        ),
    ),
    max_size=30,
)

_EXAMPLE = itertools.count()


def _canonical(configs: list[TaskPushNotificationConfig]) -> list[bytes]:
    return sorted(c.SerializeToString(deterministic=True) for c in configs)


@settings(
    max_examples=60,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=ops_strategy)
async def test_matches_in_memory_store(redis: aioredis.Redis, prefix: str, ops: list[Op]):
    ours = RedisPushNotificationConfigStore(redis, prefix=f"{prefix}:{next(_EXAMPLE)}")
    sdk = InMemoryPushNotificationConfigStore()
    for op in ops:
        if op.kind == "set":
            config = TaskPushNotificationConfig(id=op.config_id or "", url=op.url, token="t")
            assert await ours.set_info(op.task, config, ctx(op.owner)) == await sdk.set_info(
                op.task, config, ctx(op.owner)
            )
        elif op.kind == "get":
            # The documented order (last set) is the in-memory store's: compare lists.
            assert await ours.get_info(op.task, ctx(op.owner)) == await sdk.get_info(
                op.task, ctx(op.owner)
            )
        elif op.kind == "dispatch":
            # The in-memory store groups by owner first; ours is last-set order: as sets.
            assert _canonical(await ours.get_info_for_dispatch(op.task)) == _canonical(
                await sdk.get_info_for_dispatch(op.task)
            )
        else:
            await ours.delete_info(op.task, ctx(op.owner), op.config_id)
            await sdk.delete_info(op.task, ctx(op.owner), op.config_id)
    for task in TASKS:
        for owner in OWNERS:
            assert await ours.get_info(task, ctx(owner)) == await sdk.get_info(task, ctx(owner))


# -- concurrency --------------------------------------------------------------------------------
async def test_concurrent_sets_lose_nothing(store):
    owners = ("alice", "bob", "carol")
    await asyncio.gather(
        *(store.set_info("t", cfg(f"c{i}"), ctx(owner)) for owner in owners for i in range(10))
    )
    for owner in owners:
        assert sorted(ids(await store.get_info("t", ctx(owner)))) == sorted(
            f"c{i}" for i in range(10)
        )
    await asyncio.gather(
        *(store.set_info("t", cfg("same", url=f"https://h/{i}"), ctx("dave")) for i in range(10))
    )
    assert ids(await store.get_info("t", ctx("dave"))) == ["same"]
    assert len(await store.get_info_for_dispatch("t")) == 31


# -- retention ----------------------------------------------------------------------------------
async def test_no_ttl_by_default_and_ttl_renewed_on_set(redis, prefix):
    key = Keys(prefix).push_configs("t")
    plain = RedisPushNotificationConfigStore(redis, prefix=prefix)
    await plain.set_info("t", cfg("a"), ctx())
    assert await redis.pttl(key) == -1
    timed = RedisPushNotificationConfigStore(redis, prefix=prefix, ttl=100)
    await timed.set_info("t", cfg("b"), ctx())
    assert 0 < await redis.pttl(key) <= 100_000
    await redis.pexpire(key, 5_000_000)
    await timed.set_info("t", cfg("b"), ctx())  # renewed to ttl
    assert 0 < await redis.pttl(key) <= 100_000
    await timed.delete_info("t", ctx(), "b")  # a delete does not renew
    assert 0 < await redis.pttl(key) <= 100_000


def test_constructor_validation(redis):
    with pytest.raises(ValueError, match="ttl"):
        RedisPushNotificationConfigStore(redis, ttl=0)
    with pytest.raises(ValueError):
        RedisPushNotificationConfigStore(redis, encryption_key=b"not a fernet key")
    with pytest.raises(ValueError, match="prefix"):
        RedisPushNotificationConfigStore(redis, prefix="{bad}")
    decoding = aioredis.Redis(decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisPushNotificationConfigStore(decoding)


# -- encryption ---------------------------------------------------------------------------------
async def _everything_under(redis: aioredis.Redis, prefix: str) -> bytes:
    """All bytes Redis holds under the prefix: key names, DUMPs and hash contents."""
    blobs: list[bytes] = []
    async for key in redis.scan_iter(match=Keys(prefix).scan_pattern()):
        blobs.append(key)
        dumped = await redis.dump(key)
        if isinstance(dumped, bytes):
            blobs.append(dumped)
        if await redis.type(key) == b"hash":
            for f, v in (await redis.hgetall(key)).items():
                blobs += (f, v)
    return b"\n".join(blobs)


SECRETS = (URL.encode(), TOKEN.encode(), CREDENTIALS.encode(), b"secret")


async def test_plaintext_store_does_hold_the_secrets(store, redis, prefix):
    """The leak check below can see secrets when they are there."""
    await store.set_info("t", cfg("c"), ctx())
    everything = await _everything_under(redis, prefix)
    assert all(s in everything for s in SECRETS[:3])


async def test_encrypted_store_holds_no_secret(redis, prefix):
    key = Fernet.generate_key()
    store = RedisPushNotificationConfigStore(redis, prefix=prefix, encryption_key=key)
    str_key_store = RedisPushNotificationConfigStore(
        redis, prefix=prefix, encryption_key=key.decode()
    )
    for owner in ("alice", "bob"):
        for task in ("t1", "t2"):
            await store.set_info(task, cfg("c"), ctx(owner))
            await store.set_info(task, cfg(""), ctx(owner))
    everything = await _everything_under(redis, prefix)
    for secret in SECRETS:
        assert secret not in everything
    assert b"hooks.example.com" not in everything
    got = await str_key_store.get_info("t1", ctx("alice"))
    assert ids(got) == ["c", "t1"]
    assert got[0].url == URL and got[0].token == TOKEN
    assert got[0].authentication.credentials == CREDENTIALS
    assert len(await store.get_info_for_dispatch("t2")) == 4


async def test_wrong_key_raises_decryption_error_naming_the_key(redis, prefix):
    writer = RedisPushNotificationConfigStore(
        redis, prefix=prefix, encryption_key=Fernet.generate_key()
    )
    await writer.set_info("t", cfg("c"), ctx())
    redis_key = Keys(prefix).push_configs("t")
    for reader in (
        RedisPushNotificationConfigStore(
            redis, prefix=prefix, encryption_key=Fernet.generate_key()
        ),
        RedisPushNotificationConfigStore(redis, prefix=prefix),  # no key at all
    ):
        for call in (reader.get_info("t", ctx()), reader.get_info_for_dispatch("t")):
            with pytest.raises(DecryptionError) as info:
                await call
            assert info.value.key == redis_key
            assert redis_key in str(info.value)
            assert isinstance(info.value, CorruptDataError)
            assert TOKEN not in str(info.value) and URL not in str(info.value)
        await reader.delete_info("t", ctx(), "c")  # deleting needs no key
        assert await redis.exists(redis_key) == 0
        await writer.set_info("t", cfg("c"), ctx())


async def test_tampered_ciphertext_raises_decryption_error(redis, prefix):
    store = RedisPushNotificationConfigStore(
        redis, prefix=prefix, encryption_key=Fernet.generate_key()
    )
    await store.set_info("t", cfg("c"), ctx())
    key = Keys(prefix).push_configs("t")
    schema, seq, owner, sealed, token = msgpack.unpackb(
        await redis.hget(key, push_config_field("alice", "c"))
    )
    assert sealed is True
    flipped = bytearray(token)
    flipped[len(flipped) // 2] ^= 1
    await redis.hset(
        key,
        push_config_field("alice", "c"),
        msgpack.packb([schema, seq, owner, sealed, bytes(flipped)]),
    )
    with pytest.raises(DecryptionError) as info:
        await store.get_info("t", ctx())
    assert info.value.key == key


async def test_ciphertext_moved_to_another_owner_or_task_is_refused(redis, prefix):
    store = RedisPushNotificationConfigStore(
        redis, prefix=prefix, encryption_key=Fernet.generate_key()
    )
    await store.set_info("t", cfg("c"), ctx("alice"))
    keys = Keys(prefix)
    raw = await redis.hget(keys.push_configs("t"), push_config_field("alice", "c"))
    schema, seq, _, sealed, token = msgpack.unpackb(raw)
    # Into mallory's field, with mallory named in the (unauthenticated) envelope.
    await redis.hset(
        keys.push_configs("t"),
        push_config_field("mallory", "c"),
        msgpack.packb([schema, seq, b"mallory", sealed, token]),
    )
    with pytest.raises(CorruptDataError, match="another owner"):
        await store.get_info("t", ctx("mallory"))
    # Into another task's hash, same owner and id.
    await redis.hset(keys.push_configs("t2"), push_config_field("alice", "c"), raw)
    with pytest.raises(CorruptDataError, match="another task"):
        await store.get_info("t2", ctx("alice"))
    assert ids(await store.get_info("t", ctx("alice"))) == ["c"]


async def test_plaintext_records_are_read_by_an_encrypting_store(redis, prefix):
    """Switching encryption on over existing data: old records read, rewritten sealed."""
    await RedisPushNotificationConfigStore(redis, prefix=prefix).set_info("t", cfg("c"), ctx())
    store = RedisPushNotificationConfigStore(
        redis, prefix=prefix, encryption_key=Fernet.generate_key()
    )
    (got,) = await store.get_info("t", ctx())
    assert got.url == URL
    await store.set_info("t", got, ctx())
    assert URL.encode() not in await _everything_under(redis, prefix)


# -- corrupt data and faults --------------------------------------------------------------------
async def test_corrupt_bytes_raise_corrupt_data_error(store, redis, prefix):
    key = Keys(prefix).push_configs("t")
    await store.set_info("t", cfg("ok"), ctx("bob"))
    good = await redis.hget(key, push_config_field("bob", "ok"))
    schema, seq, _, sealed, payload = msgpack.unpackb(good)
    planted = {
        b"garbage \xff\x00": CorruptDataError,
        msgpack.packb({"a": 1}): CorruptDataError,
        msgpack.packb([1, 2]): CorruptDataError,
        msgpack.packb([schema, seq, b"alice", sealed, b"\xff\xff\xff"]): CorruptDataError,
        msgpack.packb([schema, "x", b"alice", sealed, payload]): CorruptDataError,
        msgpack.packb([schema + 1, seq, b"alice", sealed, payload]): UnsupportedSchemaError,
        msgpack.packb([schema, seq, b"alice", True, b"not a token"]): DecryptionError,
    }
    for value, error in planted.items():
        await redis.hset(key, push_config_field("alice", "c"), value)
        with pytest.raises(error) as info:
            await store.get_info("t", ctx("alice"))
        assert info.value.key == key
        with pytest.raises(error):
            await store.get_info_for_dispatch("t")  # nothing dropped silently
        # Another owner's read does not decode alice's records.
        assert ids(await store.get_info("t", ctx("bob"))) == ["ok"]
    # A field that is not "owner:id" at all.
    await redis.hdel(key, push_config_field("alice", "c"))
    await redis.hset(key, b"nocolon", good)
    with pytest.raises(CorruptDataError):
        await store.get_info_for_dispatch("t")
    await redis.hdel(key, b"nocolon")
    # The record of bob's "ok" placed under another id.
    await redis.hset(key, push_config_field("bob", "other"), good)
    with pytest.raises(CorruptDataError, match="another task or config id"):
        await store.get_info("t", ctx("bob"))
    # A corrupt write counter is reported by the next write.
    await redis.hset(key, b"#seq", b"not a number")
    with pytest.raises(CorruptDataError) as info:
        await store.set_info("t", cfg("x"), ctx("bob"))
    assert info.value.key == key


async def test_wrong_type_raises_corrupt_data_error(store, redis, prefix):
    key = Keys(prefix).push_configs("t")
    await redis.set(key, b"a string")
    calls = [
        store.set_info("t", cfg("c"), ctx()),
        store.get_info("t", ctx()),
        store.get_info_for_dispatch("t"),
        store.delete_info("t", ctx()),
        store.delete_info("t", ctx(), "c"),
    ]
    for call in calls:
        with pytest.raises(CorruptDataError) as info:
            await call
        assert info.value.key == key


async def test_outage_raises_redis_unavailable_never_empty(prefix):
    client = aioredis.Redis(port=1, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1)
    store = RedisPushNotificationConfigStore(client, prefix=prefix)
    calls = [
        store.set_info("t", cfg("c"), ctx()),
        store.get_info("t", ctx()),
        store.get_info_for_dispatch("t"),
        store.delete_info("t", ctx()),
        store.delete_info("t", ctx(), "c"),
    ]
    try:
        for call in calls:
            with pytest.raises(RedisUnavailableError) as info:
                await call
            assert isinstance(info.value, A2ARedisError)
            assert info.value.key == Keys(prefix).push_configs("t")
    finally:
        await client.aclose()
