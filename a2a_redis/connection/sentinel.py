"""Redis Sentinel: the ``redis+sentinel://`` URL and the client of the master it names.

What the Sentinels say about the deployment is reported by ``ops/topology.py``.

URL form (the one of the ``Redis-Sentinel-Url`` package, redisvl and prefect-redis)::

    redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/service_name[/db][?options]
    rediss+sentinel://...   TLS to the data nodes and to the Sentinels

* ``host:port`` pairs are the Sentinels (port 26379 unless given; IPv6 as ``[::1]:26379``);
  ``service_name`` is the master's name in their configuration (``sentinel monitor NAME``).
* The username and password authenticate to the data nodes (master and replicas).
* ``options`` are redis-py's URL options for the data-node connections (``socket_timeout``,
  ``ssl_ca_certs``, ...), except: ``sentinel_username`` and ``sentinel_password``
  authenticate to the Sentinels, and ``min_other_sentinels`` makes the client trust only a
  Sentinel that sees at least that many peers.

:func:`sentinel_client` builds a ``redis.asyncio.Redis`` on a blocking pool of
Sentinel-managed connections: each new connection asks the Sentinels for the current master,
and a connection to a demoted master (a READONLY reply) is dropped, so after a failover the
same client reaches the promoted replica without a restart. Closing the client closes the
Sentinel connections too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from a2a_redis.connection.pool import PoolSettings

__all__ = [
    "SENTINEL_SCHEMES",
    "SentinelBlockingConnectionPool",
    "SentinelURL",
    "is_sentinel_url",
    "parse_sentinel_url",
    "sentinel_client",
]

SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
DEFAULT_SENTINEL_PORT = 26379
_SENTINEL_OPTIONS = {"sentinel_username": "username", "sentinel_password": "password"}


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` is a ``redis+sentinel://`` or ``rediss+sentinel://`` URL."""
    return url[:19].lower().startswith(SENTINEL_SCHEMES)


@dataclass(frozen=True)
class SentinelURL:
    """A parsed Sentinel URL."""

    sentinels: list[tuple[str, int]]
    service_name: str
    tls: bool
    #: Keyword arguments of the data-node connections (auth, db, TLS, URL options).
    connection_kwargs: dict[str, Any] = field(default_factory=dict)
    #: Keyword arguments of the Sentinel connections (auth, TLS).
    sentinel_kwargs: dict[str, Any] = field(default_factory=dict)
    min_other_sentinels: int = 0


def _host_port(text: str, url: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"Sentinel URL names an empty host: {_redacted(url)}")
    try:
        port = int(port_text) if port_text else DEFAULT_SENTINEL_PORT
    except ValueError:
        raise ValueError(f"Sentinel URL has a bad port {port_text!r}") from None
    return unquote(host), port


def _redacted(url: str) -> str:
    scheme, _, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hosts}" if at else url


def _options(query: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Data-node options, Sentinel options and ``min_other_sentinels`` from a URL query."""
    kwargs: dict[str, Any] = {}
    sentinel_kwargs: dict[str, Any] = {}
    min_other = 0
    for name, values in parse_qs(query).items():
        value = values[0]
        try:
            if name in _SENTINEL_OPTIONS:
                sentinel_kwargs[_SENTINEL_OPTIONS[name]] = value
            elif name == "min_other_sentinels":
                min_other = int(value)
            else:
                parser = URL_QUERY_ARGUMENT_PARSERS.get(name)
                kwargs[name] = parser(value) if parser else value
        except (TypeError, ValueError):
            raise ValueError(f"invalid value for {name!r} in the Sentinel URL") from None
    return kwargs, sentinel_kwargs, min_other


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a ``redis+sentinel://`` URL (see the module docstring); ValueError if malformed."""
    if not is_sentinel_url(url):
        raise ValueError("a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://")
    scheme, _, rest = url.partition("://")
    tls = scheme.lower().startswith("rediss")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    sentinels = [_host_port(h, url) for h in hosts.split(",") if h.strip()]
    if not sentinels:
        raise ValueError(f"Sentinel URL names no Sentinel: {_redacted(url)}")
    parts = [unquote(p) for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError(
            "Sentinel URL needs /service_name[/db] after the Sentinels, "
            f"e.g. redis+sentinel://host:26379/mymaster/0 (got {_redacted(url)})"
        )
    kwargs, sentinel_kwargs, min_other = _options(query)
    if len(parts) == 2:
        try:
            kwargs["db"] = int(parts[1])
        except ValueError:
            raise ValueError(f"Sentinel URL has a bad db {parts[1]!r}") from None
    if at:
        username, colon, password = userinfo.partition(":")
        if username:
            kwargs["username"] = unquote(username)
        if colon and password:
            kwargs["password"] = unquote(password)
    if tls:
        kwargs["ssl"] = True
        sentinel_kwargs["ssl"] = True  # one CA for the whole topology: share ssl_* options
        sentinel_kwargs.update({k: v for k, v in kwargs.items() if k.startswith("ssl_")})
    return SentinelURL(sentinels, parts[0], tls, kwargs, sentinel_kwargs, min_other)


class SentinelBlockingConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's ``SentinelConnectionPool`` with ``BlockingConnectionPool``'s waiting.

    A burst of requests waits (``timeout`` seconds) for a free connection instead of
    failing. With ``owns_sentinel``, closing the pool also closes the Sentinel connections.
    """

    def __init__(
        self,
        service_name: str,
        sentinel_manager: Sentinel,
        *,
        owns_sentinel: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self.owns_sentinel = owns_sentinel

    async def aclose(self) -> None:
        """Close every connection, then the Sentinel connections if this pool owns them."""
        try:
            await super().aclose()
        finally:
            if self.owns_sentinel:
                await self.sentinel_manager.aclose()


def sentinel_client(url: str, settings: PoolSettings | None = None) -> Redis:
    """A client of the master a Sentinel URL names, on a blocking Sentinel-managed pool.

    ``settings`` are the pool's (see ``PoolSettings``); options in the URL override them.
    Nothing connects until first use. The client owns the pool and the Sentinel
    connections: ``await client.aclose()`` closes both.
    """
    s = settings or PoolSettings()
    parsed = parse_sentinel_url(url)
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": s.socket_timeout,
        "socket_connect_timeout": s.socket_connect_timeout,
        # a Sentinel that does not answer is skipped for the next one, not retried
        "retry": Retry(NoBackoff(), 0),
        **parsed.sentinel_kwargs,
    }
    sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis-py 8.2
        parsed.sentinels,
        min_other_sentinels=parsed.min_other_sentinels,
        sentinel_kwargs=sentinel_kwargs,
    )
    options: dict[str, Any] = {
        "max_connections": s.max_connections,
        "timeout": s.pool_timeout,
        "socket_timeout": s.socket_timeout,
        "socket_connect_timeout": s.socket_connect_timeout,
        "health_check_interval": s.health_check_interval,
        # as for the other URLs: a closed pooled connection is reopened (asking the
        # Sentinels for the master again) and the command re-sent
        "retry": s.retry(),
        **parsed.connection_kwargs,
    }
    pool = SentinelBlockingConnectionPool(
        parsed.service_name, sentinel, owns_sentinel=True, is_master=True, **options
    )
    return Redis.from_pool(pool)
