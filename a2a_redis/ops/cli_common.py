"""What the ``a2a-redis`` commands share: exit codes, one-line errors, URLs, states."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit, urlunsplit

from a2a.types.a2a_pb2 import TaskState
from redis import exceptions as rex

from a2a_redis.connection.clients import client_from_url
from a2a_redis.connection.cluster import Client
from a2a_redis.connection.pool import PoolSettings

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_USAGE",
    "Fail",
    "connect",
    "describe_error",
    "int_at_least",
    "parse_state",
    "redact",
    "state_name",
]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PROBLEM, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class Fail(Exception):
    """An expected failure: printed as one line on stderr, exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def redact(url: str) -> str:
    """``url`` with its password masked."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return "<unparsable URL>"


def state_name(state: int) -> str:
    """``COMPLETED`` for ``TASK_STATE_COMPLETED`` (the number if unknown)."""
    try:
        return TaskState.Name(state).removeprefix("TASK_STATE_")
    except ValueError:
        return str(state)


STATE_NAMES = [v.name for v in TaskState.DESCRIPTOR.values if v.number]


def parse_state(text: str) -> int:
    """A state from ``completed``, ``input-required``, ``TASK_STATE_FAILED``, ... (argparse)."""
    name = text.strip().upper().replace("-", "_")
    if not name.startswith("TASK_STATE_"):
        name = "TASK_STATE_" + name
    try:
        return int(TaskState.Value(name))
    except ValueError:
        known = ", ".join(n[11:].lower() for n in STATE_NAMES)
        raise argparse.ArgumentTypeError(f"unknown state {text!r} (one of: {known})") from None


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return value

    return parse


@contextlib.asynccontextmanager
async def connect(url: str, *, writers: int = 0) -> AsyncIterator[Client]:
    """A client of ``url`` that has answered a PING; closed on exit.

    ``writers``: concurrent task writes the command runs; each may hold two connections at
    once on a cluster (its transaction, and its owner's index intent), so the pool is sized
    ``2 * writers + 4``.
    """
    # a command-line tool fails fast: no retry, a short connect timeout
    size = max(8, 2 * writers + 4)
    client = client_from_url(
        url, PoolSettings(max_connections=size, retries=0 if not writers else 1)
    )
    try:
        await client.ping()
        yield client
    finally:
        await client.aclose()


def describe_error(error: BaseException, url: str) -> str:
    """One line saying what went wrong with ``url`` (its password masked)."""
    where = redact(url)
    if isinstance(error, rex.AuthenticationError) or str(error).startswith("NOAUTH"):
        try:
            has_password = urlsplit(url).password is not None
        except ValueError:
            has_password = False
        if not has_password:
            return (
                f"{where}: the server requires a password; "
                "give it in the URL (redis://:PASSWORD@host:port/db)"
            )
        return f"{where}: authentication failed: {error}"
    if isinstance(error, (rex.ConnectionError, rex.TimeoutError)):
        return f"cannot reach Redis at {where}: {error}"
    if isinstance(error, rex.ResponseError) and str(error).startswith("MOVED"):
        return f"{where} is a cluster node and the key lives on another node: {error}"
    if isinstance(error, rex.RedisError):
        return f"Redis error from {where}: {error}"
    return str(error)
