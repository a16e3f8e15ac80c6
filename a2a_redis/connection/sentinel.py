"""Redis Sentinel: the ``redis+sentinel://`` URL, the master client, and the doctor's view.

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

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from redis import exceptions as rex
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from a2a_redis.connection.compat import reply_pairs
from a2a_redis.connection.pool import PoolSettings

if TYPE_CHECKING:
    from a2a_redis.ops.doctor import Report

__all__ = [
    "SENTINEL_SCHEMES",
    "SentinelBlockingConnectionPool",
    "SentinelURL",
    "is_sentinel_url",
    "parse_sentinel_url",
    "report_topology",
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


# -- doctor --------------------------------------------------------------------------------
def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _fields(reply: Any) -> dict[str, str]:
    """A Sentinel reply (flat RESP2 pairs or a RESP3 map) as a dict of strings."""
    return {_text(k): _text(v) for k, v in reply_pairs(reply)}


@dataclass
class _SentinelView:
    address: str
    master: dict[str, str]
    replicas: list[dict[str, str]]
    peers: int


def _address(client: Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


async def _ask(sentinel: Redis, service: str, report: Report) -> _SentinelView | None:
    """What one Sentinel says about ``service``; None (after a warning) if it cannot say."""
    address = _address(sentinel)
    ask: Any = sentinel.execute_command
    try:
        master = _fields(await ask("SENTINEL", "MASTER", service))
        replicas = [_fields(r) for r in await ask("SENTINEL", "REPLICAS", service)]
        peers = len(await ask("SENTINEL", "SENTINELS", service))
    except (rex.ConnectionError, rex.TimeoutError) as e:
        report.problem(f"Sentinel {address} is unreachable: {e}")
        return None
    except rex.ResponseError as e:
        report.problem(f"Sentinel {address} does not monitor {service!r}: {e}")
        return None
    return _SentinelView(address, master, replicas, peers)


def _node_kwargs(pool: SentinelConnectionPool) -> dict[str, Any]:
    """Connection options of the pool's data nodes (auth, TLS, timeouts) for one node."""
    kwargs = {
        k: v
        for k, v in pool.connection_kwargs.items()
        if k in ("username", "password", "credential_provider", "protocol")
        or k.startswith(("ssl_", "socket_"))
    }
    if issubclass(pool.connection_class, SSLConnection):
        kwargs["ssl"] = True
    kwargs["socket_timeout"] = kwargs["socket_connect_timeout"] = 5.0
    return kwargs


async def _persistence(state: dict[str, str], kwargs: dict[str, Any]) -> tuple[str, bool | None]:
    """("AOF on; RDB ...", has persistence) of a data node; None when it cannot tell."""
    client = Redis(
        host=state.get("ip", ""),
        port=int(state.get("port", "0") or 0),
        retry=Retry(NoBackoff(), 0),
        **kwargs,
    )
    try:
        aof, save = [_fields(await client.config_get(name)).get(name, "") for name in _PERSISTENCE]
    except (rex.ConnectionError, rex.TimeoutError, rex.ResponseError) as e:
        return f"persistence unknown ({e})", None
    finally:
        with contextlib.suppress(rex.ConnectionError, OSError):
            await client.aclose()
    has = aof == "yes" or bool(save.strip())
    return f"AOF {'on' if aof == 'yes' else 'off'}, RDB {repr(save) if save else 'off'}", has


_PERSISTENCE = ("appendonly", "save")


def _flags(state: dict[str, str]) -> set[str]:
    return set(state.get("flags", "").split(","))


async def report_topology(client: Redis, report: Report) -> None:
    """The doctor's lines for a Sentinel-managed client: what its Sentinels say.

    Lines: the Sentinels (in the client, answering, monitoring the service, quorum), the
    master and its flags, each replica with its link status and persistence. Problems: a
    Sentinel that does not answer, Sentinels that disagree on the master, fewer than 3
    Sentinels, a quorum larger than the Sentinels, a master seen down, no replica, a
    replica not replicating, a replica or master without persistence.
    """
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    service: str = pool.service_name
    sentinels: list[Redis] = pool.sentinel_manager.sentinels
    views = [v for s in sentinels if (v := await _ask(s, service, report)) is not None]
    if not views:
        raise rex.ConnectionError(f"no Sentinel answered for the service {service!r}")
    view = views[0]
    master = view.master
    address = f"{master.get('ip', '?')}:{master.get('port', '?')}"
    known, quorum = view.peers + 1, int(master.get("quorum", "0") or 0)
    report.line(
        "sentinels",
        f"{len(sentinels)} in the URL, {len(views)} answered; {known} monitor {service!r} "
        f"(per {view.address}); quorum {quorum}",
    )
    seen = {f"{v.master.get('ip')}:{v.master.get('port')}" for v in views}
    if len(seen) > 1:
        report.problem(f"the Sentinels disagree on the master: {', '.join(sorted(seen))}")
    if known < 3:
        report.problem(
            f"only {known} Sentinel(s) monitor {service!r}: a failover needs a majority of "
            "them, so run at least 3, on separate machines"
        )
    if quorum > known:
        report.problem(f"quorum {quorum} exceeds the {known} Sentinels: no failover can happen")
    flags = _flags(master)
    report.line("master", f"{service} at {address}, flags {','.join(sorted(flags))}")
    if flags & {"s_down", "o_down", "disconnected"}:
        report.problem(f"the Sentinels see the master {address} as down")
    kwargs = _node_kwargs(pool)
    if not view.replicas:
        report.problem("no replica: a failover has nothing to promote, and WAIT cannot succeed")
    for replica in view.replicas:
        where = f"{replica.get('ip', '?')}:{replica.get('port', '?')}"
        link = replica.get("master-link-status", "?")
        persistence, has = await _persistence(replica, kwargs)
        offset = replica.get("slave-repl-offset", "?")
        report.line("replica", f"{where}, link {link}, offset {offset}; {persistence}")
        if link != "ok" or _flags(replica) & {"s_down", "o_down", "disconnected"}:
            report.problem(f"replica {where} is not replicating (link {link})")
        if has is False:
            report.problem(
                f"replica {where} has no persistence (appendonly no, no save points): "
                "once promoted, a restart of it loses every task"
            )
    _, has = await _persistence(master, kwargs)
    if has is False:
        report.problem(
            f"the master {address} has no persistence: if it restarts before a failover it "
            "comes back empty, and its replicas copy the empty data set"
        )
