"""A subscription that fails during an outage fails with the typed error, never redis-py's.

Found by the secrets scenario (test_secrets.py): a remote SubscribeToTask that joined just
before a SIGKILL of the server, and whose backlog read then failed, ended with
``AttributeError: 'NoneType' object has no attribute 'credential_provider'`` instead of
``RedisUnavailableError``. Its clean-up (UNSUBSCRIBE on the shared pub/sub, retrying its
connect while the server was down) ran on the pub/sub that the listener's reconnect loop
closed at the same moment, once the server was back. The fix: the reconnect loop replaces
and closes the pub/sub under the lock that guards every pub/sub command.

Here the subscription's start (its backlog read) kills the server, waits until the listener
has seen the loss, schedules the restart (blocking the loop as the test's ``start()`` does,
so the UNSUBSCRIBE's retries and the reconnect loop wake together), and fails.
"""

from __future__ import annotations

import asyncio

import pytest

from a2a_redis import RedisBackend, RedisUnavailableError
from a2a_redis.log.event_log import Position, StreamEntry
from a2a_redis.ops.embedded import EmbeddedServer

GUARD = 30.0  # seconds: a hang guard only
ROUNDS = 8  # before the fix, about 6 rounds in 10 ended with the AttributeError


async def fail_across_a_restart(server: EmbeddedServer, backend: RedisBackend) -> None:
    """One subscription whose start kills the server and fails as the server comes back."""

    async def start() -> tuple[list[StreamEntry], Position]:
        server.kill()
        while backend.listener.connected:  # bounded by the test's timeout
            await asyncio.sleep(0.001)
        asyncio.get_running_loop().call_later(0.005, server.start)
        raise RedisUnavailableError("the backlog read failed", key="k")

    async for _ in backend.listener.follow("t", start):
        raise AssertionError("no entry can arrive")


async def test_a_subscription_failing_across_a_restart_raises_the_typed_error(
    prefix: str,
) -> None:
    for _ in range(ROUNDS):
        with EmbeddedServer() as server:
            backend = RedisBackend.from_url(server.url, prefix=prefix, socket_connect_timeout=1)
            try:
                with pytest.raises(Exception) as info:
                    await asyncio.wait_for(fail_across_a_restart(server, backend), GUARD)
                assert isinstance(info.value, RedisUnavailableError), repr(info.value)
                # The listener recovers: a new subscription joins once the server is back.
                joined = await asyncio.wait_for(backend.listener.join("u"), GUARD)
                await backend.listener.leave(joined)
            finally:
                await backend.aclose()
