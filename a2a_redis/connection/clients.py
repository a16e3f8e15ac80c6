"""One way from a URL to a client, for every scheme, on a pool built from ``PoolSettings``.

``redis://``, ``rediss://``, ``unix://``, a Redis Cluster (``redis+cluster://``) or
Sentinel (``redis+sentinel://``).

As saq's ``Queue.from_url``: one branch per scheme. ``RedisBackend.from_url`` and the
command line both connect through :func:`client_from_url`.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis

from a2a_redis.connection.cluster import CLUSTER_SCHEMES, Client, cluster_client
from a2a_redis.connection.pool import PoolSettings
from a2a_redis.connection.sentinel import is_sentinel_url, sentinel_client

__all__ = ["PLAIN_SCHEMES", "client_from_url"]

PLAIN_SCHEMES = ("redis", "rediss", "unix")


def client_from_url(url: str, settings: PoolSettings | None = None) -> Client:
    """A client of ``url`` that owns its pool (``await client.aclose()`` closes it).

    Nothing connects until first use. Raises ``ValueError`` for an unknown scheme.
    """
    s = settings or PoolSettings()
    scheme = url.partition("://")[0].lower()
    if is_sentinel_url(url):
        return sentinel_client(url, s)
    if scheme in PLAIN_SCHEMES:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=s.max_connections,
            timeout=s.pool_timeout,
            socket_timeout=s.socket_timeout,
            socket_connect_timeout=s.socket_connect_timeout,
            health_check_interval=s.health_check_interval,
            # A pooled connection the server closed while idle (its `timeout`, a proxy, a
            # restart) is reopened and the command re-sent, as redis-py's own Redis(...)
            # does by default; a pool built from a URL would otherwise get no retry at all.
            retry=s.retry(),
        )
        return Redis.from_pool(pool)
    if scheme in CLUSTER_SCHEMES:
        return cluster_client(
            url,
            max_connections=s.max_connections,
            pool_timeout=s.pool_timeout,
            socket_timeout=s.socket_timeout,
            socket_connect_timeout=s.socket_connect_timeout,
            health_check_interval=s.health_check_interval,
            retry=s.retry(),
        )
    raise ValueError(
        f"unsupported Redis URL scheme {scheme + '://'!r}: use redis://, rediss:// (TLS), unix://, "
        "redis+cluster:// or redis+sentinel://"
    )
