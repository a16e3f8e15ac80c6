"""Fixtures of the handler suites that drive two replica processes with the official client.

A module provides ``replicas`` (its pair of ``examples/agent_server.py`` processes, started
with the options it needs); ``clients`` are the official client of each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from a2a.client import Client

from tests.helpers import ReplicaProcess, client_pair


@pytest.fixture
async def clients(
    replicas: tuple[ReplicaProcess, ReplicaProcess],
) -> AsyncIterator[tuple[Client, Client]]:
    async with client_pair(*replicas) as pair:
        yield pair
