"""The push-config store's limit on configs per task, and its delivery jobs.

On the real servers and on fakeredis (the ``redis`` fixture).
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from a2a.types.a2a_pb2 import TaskPushNotificationConfig
from a2a.utils.errors import InvalidParamsError

from a2a_redis.errors import A2ARedisError, TooManyPushConfigsError
from a2a_redis.stores.push_config_store import (
    DEFAULT_MAX_CONFIGS_PER_TASK,
    RedisPushNotificationConfigStore,
)
from tests.helpers import ctx


def cfg(config_id: str) -> TaskPushNotificationConfig:
    return TaskPushNotificationConfig(id=config_id, url=f"https://hooks.example/{config_id}")


async def test_the_101st_config_is_refused_with_a_typed_error(
    redis: aioredis.Redis, prefix: str
) -> None:
    store = RedisPushNotificationConfigStore(redis, prefix=prefix)
    assert store.max_configs_per_task == DEFAULT_MAX_CONFIGS_PER_TASK == 100
    for i in range(50):
        await store.set_info("t", cfg(f"a{i}"), ctx("alice"))
    for i in range(50):
        await store.set_info("t", cfg(f"b{i}"), ctx("bob"))  # owners count together
    with pytest.raises(TooManyPushConfigsError) as caught:
        await store.set_info("t", cfg("one-more"), ctx("carol"))
    error = caught.value
    assert isinstance(error, InvalidParamsError) and isinstance(error, A2ARedisError)
    assert error.limit == 100 and error.key == store.keys.push_configs("t")
    assert len(await store.get_info_for_dispatch("t")) == 100
    await store.set_info("t", cfg("a7"), ctx("alice"))  # replacing one is allowed
    await store.delete_info("t", ctx("alice"), "a0")
    await store.set_info("t", cfg("one-more"), ctx("carol"))  # room again
    await store.set_info("other", cfg("a0"), ctx("alice"))  # per task


async def test_limit_is_configurable_and_zero_means_none(
    redis: aioredis.Redis, prefix: str
) -> None:
    store = RedisPushNotificationConfigStore(redis, prefix=prefix, max_configs_per_task=2)
    await store.set_info("t", cfg("a"), ctx())
    await store.set_info("t", cfg("b"), ctx())
    with pytest.raises(TooManyPushConfigsError):
        await store.set_info("t", cfg("c"), ctx())
    store.set_max_configs(0)
    await store.set_info("t", cfg("c"), ctx())
    with pytest.raises(ValueError):
        RedisPushNotificationConfigStore(redis, prefix=prefix, max_configs_per_task=-1)


async def test_jobs_are_recorded_only_when_switched_on(redis: aioredis.Redis, prefix: str) -> None:
    store = RedisPushNotificationConfigStore(redis, prefix=prefix)
    await store.set_info("t", cfg("a"), ctx())
    assert await redis.exists(store.keys.push_jobs) == 0  # no sender: no cost
    store.record_deliveries()
    await store.set_info("t", cfg("a"), ctx())
    rows = await redis.xrange(store.keys.push_jobs)
    assert [fields for _, fields in rows] == [{b"t": b"t", b"f": b"alice:a"}]
    config = await store.config_at("t", b"alice:a")
    assert config is not None and config.url == "https://hooks.example/a"
    assert await store.config_at("t", b"alice:gone") is None
