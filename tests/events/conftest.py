"""Fixtures of the event tests: queue managers, one per "replica", on the test's backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from a2a_redis.events.queue_manager import RedisQueueManager


@pytest.fixture
async def managers(
    client_factory: Callable[[], aioredis.Redis], redis: aioredis.Redis, prefix: str
) -> AsyncIterator[Callable[..., RedisQueueManager]]:
    """Makes ``RedisQueueManager``s on the test's prefix, each with its own client."""
    made: list[RedisQueueManager] = []

    def make(**kwargs: object) -> RedisQueueManager:
        made.append(RedisQueueManager(client_factory(), prefix=prefix, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for manager in made:
        await manager.aclose()
