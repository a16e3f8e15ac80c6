"""``PoolSettings``: the connection pool every client made from a URL gets."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

__all__ = ["PoolSettings"]


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """The connection pool a URL's client gets.

    Attributes:
        max_connections: The pool's size (default 64); on a cluster, each node's pool size
            and the bound on concurrent operations.
        pool_timeout: Seconds a command waits for a free connection before
            ``PoolExhaustedError`` (a blocking pool: a burst waits instead of failing).
        socket_timeout: Seconds a reply may take.
        socket_connect_timeout: Seconds a connection may take to open.
        health_check_interval: Seconds after which an idle connection is checked first.
        retries: Times a command that meets a closed connection is re-sent, with a short
            jittered backoff (task-store writes use their own transaction and write id).
    """

    max_connections: int = 64
    pool_timeout: float = 10.0
    socket_timeout: float = 10.0
    socket_connect_timeout: float = 5.0
    health_check_interval: float = 30.0
    retries: int = 3

    def retry(self) -> Retry:
        """redis-py's retry policy for these settings."""
        return Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.5), self.retries)
