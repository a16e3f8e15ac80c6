"""Redis Cluster plumbing: which client we have, the node a key lives on, redirects.

Every key of one task shares the hash tag ``{t:ID}`` and every index key of one owner
shares ``{o:OWNER}``, so each transaction and script touches one slot. What differs on a
cluster is where a connection comes from (the node owning the slot, not one pool) and
what happens when a slot moves (``MOVED``/``ASK``/``TRYAGAIN``): this module holds both,
for ``transaction.py`` and ``links.py``.

A ``redis.asyncio.cluster.RedisCluster`` is recognised by type; every component then
uses shard channels (``SPUBLISH``/``SSUBSCRIBE``) and keeps ListTasks indexes across
slots (see ``stores/task_index.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeAlias, cast
from urllib.parse import unquote, urlsplit

from redis import exceptions as rex
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection

from a2a_redis.connection.compat import within
from a2a_redis.errors import PoolExhaustedError

if TYPE_CHECKING:  # for mypy only: no runtime dependency
    from typing_extensions import TypeIs

__all__ = [
    "CLUSTER_SCHEMES",
    "REDIRECTS",
    "Client",
    "SlotMovedError",
    "checkout",
    "cluster_client",
    "is_cluster",
    "node_client",
    "note_redirect",
]

#: A client of one Redis server (or a Sentinel-managed primary) or of a Redis Cluster.
Client: TypeAlias = "Redis | RedisCluster"

#: Replies meaning "this slot is (being) served elsewhere; ask again".
REDIRECTS = (rex.AskError, rex.TryAgainError, rex.ClusterDownError)


class SlotMovedError(rex.ConnectionError):
    """A slot moved (or is moving) between nodes mid-transaction: retry on the new owner.

    A ``ConnectionError`` for the callers' retry loops: like a dropped connection, it
    means "nothing was written by this attempt, try again". The slot map has been
    refreshed by the time it is raised.
    """


def is_cluster(redis: Any) -> TypeIs[RedisCluster]:
    """True for a ``redis.asyncio.cluster.RedisCluster``."""
    kind = type(redis)  # (isinstance against RedisCluster, a Protocol, takes microseconds)
    found = _CLUSTER_TYPES.get(kind)
    if found is None:
        found = _CLUSTER_TYPES[kind] = isinstance(redis, RedisCluster)
    return found


_CLUSTER_TYPES: dict[type, bool] = {}


def node_client(node: ClusterNode, address: str | None = None) -> Redis:
    """A plain client of one cluster node, on its own pool (closing the client closes it).

    ``address`` (``host:port``) names another node reached with the same credentials.
    """
    kwargs = dict(node.connection_kwargs)
    if address is not None:
        host, _, port = address.rpartition(":")
        kwargs.update(host=host, port=int(port))
    return Redis.from_pool(ConnectionPool(connection_class=node.connection_class, **kwargs))


async def checkout(
    redis: RedisCluster, key: str
) -> tuple[AbstractConnection, Callable[[AbstractConnection], Any]]:
    """A connection to the primary owning ``key``'s slot, and the function releasing it."""
    await redis.initialize()  # no-op once the slot map is loaded
    try:
        node: ClusterNode | None = redis.get_node_from_key(key)
    except rex.SlotNotCoveredError as e:
        await redis.nodes_manager.initialize()
        raise SlotMovedError(f"slot of {key!r} is not covered: {e}") from e
    assert node is not None
    if not isinstance(redis, _Cluster):
        release = cast("Callable[[AbstractConnection], Any]", node.release)
        return node.acquire_connection(), release
    permit = redis.permit(key)
    await permit.__aenter__()
    try:
        conn = node.acquire_connection()
    except BaseException:
        await permit.__aexit__(None, None, None)
        raise

    async def release_with_permit(connection: AbstractConnection) -> None:
        try:
            node.release(connection)  # type: ignore[arg-type]
        finally:
            await permit.__aexit__(None, None, None)

    return conn, release_with_permit


async def note_redirect(redis: RedisCluster, error: rex.ResponseError, key: str) -> SlotMovedError:
    """Update the slot map after ``error`` (MOVED patches it; others wait for the move)."""
    if isinstance(error, rex.MovedError):
        await redis.nodes_manager.move_slot(error)
    return SlotMovedError(f"slot of {key!r} moved: {error}")


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


_HOLDS_PERMIT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "a2a_redis_permit", default=False
)


class _Cluster(RedisCluster):
    """The ``RedisCluster`` that ``RedisBackend.from_url`` makes.

    * Its first commands wait for one slot-map load. redis-py 8.1 routes a command (and
      may open a connection to a seed) before it loads the map; commands issued
      concurrently on a fresh client then race the load, which closes the seeds'
      connections under them (``'NoneType' object has no attribute 'writelines'``).
    * Bursts wait for a connection, as with a ``BlockingConnectionPool``: at most
      ``max_connections`` operations run at once (so no node's pool of that size runs
      dry), and one waits up to ``pool_timeout`` seconds for a permit before
      ``PoolExhaustedError``. A plain ``RedisCluster`` fails at once instead.
    """

    def __init__(self, *, pool_timeout: float | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.permits = asyncio.Semaphore(options.get("max_connections", 100))
        self.pool_timeout = pool_timeout

    @contextlib.asynccontextmanager
    async def permit(self, key: str = "") -> AsyncIterator[None]:
        """Hold one of the ``max_connections`` permits (PoolExhaustedError after the wait).

        Re-entrant within one task: a pipeline retrying a redirected command individually
        does not wait for a second permit.
        """
        if _HOLDS_PERMIT.get():
            yield
            return
        try:
            await within(self.permits.acquire(), self.pool_timeout)
        except TimeoutError as e:
            raise PoolExhaustedError(
                f"no Redis Cluster connection free within {self.pool_timeout}s", key=key or None
            ) from e
        token = _HOLDS_PERMIT.set(True)
        try:
            yield
        finally:
            _HOLDS_PERMIT.reset(token)
            self.permits.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            await self.initialize()
        async with self.permit():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        async def execute_with_permit(
            raise_on_error: bool = True, allow_redirections: bool = True
        ) -> Any:
            if self._initialize:
                await self.initialize()
            async with self.permit():
                return await execute(raise_on_error, allow_redirections)

        pipe.execute = execute_with_permit  # type: ignore[method-assign]
        return pipe


def cluster_client(url: str, **options: Any) -> RedisCluster:
    """A ``RedisCluster`` for ``redis+cluster://[[user]:password@]host:port[,host:port...]``.

    ``rediss+cluster://`` uses TLS. Every listed node is a seed: the client loads the slot
    map from the first that answers. ``options`` go to ``RedisCluster`` (``max_connections``
    is per node).
    """
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a cluster URL: {parts.scheme}://")
    if parts.path not in ("", "/", "/0"):
        raise ValueError("a Redis Cluster has one database (0): drop the /db from the URL")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    seeds = []
    for hostport in hosts.split(","):
        host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "6379")
        if not host:
            raise ValueError(f"invalid cluster seed {hostport!r} in the URL")
        seeds.append(ClusterNode(host.strip("[]"), int(port)))
    return _Cluster(
        startup_nodes=seeds,
        username=unquote(username) or None,
        password=unquote(password) or None,
        ssl=parts.scheme == "rediss+cluster",
        **options,
    )
