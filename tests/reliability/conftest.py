"""Fixtures of the reliability suites: private servers a test may kill, pause and restart.

The deployments themselves are the package's embedded server (and, for Sentinel, the
deployment in ``tests/deployments.py``); two replicas on one are ``backend_pair`` in
``tests/helpers.py``. Each server is stopped by its pid after the test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from a2a_redis.ops.embedded import EmbeddedServer


@pytest.fixture
def private_server() -> Iterator[EmbeddedServer]:
    """A server of the test's own, without persistence: what a restart finds is empty."""
    with EmbeddedServer() as server:
        yield server


@pytest.fixture
def durable_server() -> Iterator[EmbeddedServer]:
    """A server of the test's own with AOF (``appendfsync always``): acknowledged writes
    survive a SIGKILL and a restart on the same port."""
    with EmbeddedServer(appendonly=True) as server:
        yield server
