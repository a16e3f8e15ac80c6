"""``RedisBackend``: one connection pool, every component, and the handler in one line.

    backend = RedisBackend.from_url("redis://localhost:6379/0")
    handler = backend.request_handler(agent_executor, agent_card)   # V2, cluster mode
    ...
    await backend.aclose()

Every component shares the backend's one client (one pool) and one :class:`StreamListener`
(one pub/sub connection). ``from_url`` creates and owns the pool (a blocking pool: a burst
of requests waits for a free connection instead of failing); ``RedisBackend(client)``
uses a client the caller owns and never closes it.
"""

from __future__ import annotations

import contextlib
import time
from types import TracebackType
from typing import Any

from a2a.server.agent_execution import AgentExecutor
from a2a.server.owner_resolver import OwnerResolver, resolve_user_scope
from a2a.server.request_handlers import RequestHandler
from a2a.types import AgentCard
from redis import exceptions as rex

from a2a_redis.connection.clients import client_from_url
from a2a_redis.connection.cluster import Client, is_cluster
from a2a_redis.connection.durability import Durability
from a2a_redis.connection.pool import PoolSettings
from a2a_redis.errors import redis_errors
from a2a_redis.events.control import ControlPlane
from a2a_redis.events.event_stream import RedisTaskEventStream
from a2a_redis.events.leases import LeaseKeeper
from a2a_redis.events.listener import StreamListener
from a2a_redis.events.plumbing import EventPlumbing
from a2a_redis.events.queue_manager import RedisQueueManager
from a2a_redis.handlers.legacy import RedisLegacyRequestHandler
from a2a_redis.handlers.v2 import RedisRequestHandler
from a2a_redis.log.codec import MAX_PAYLOAD_BYTES
from a2a_redis.log.event_log import StreamRetention
from a2a_redis.options import DEFAULT_CANCEL_TIMEOUT, DEFAULT_LEASE_TTL, Options
from a2a_redis.push.sender import RedisPushNotificationSender
from a2a_redis.stores.push_config_store import RedisPushNotificationConfigStore
from a2a_redis.stores.task_store import RedisTaskStore, VersionedRedisTaskStore

__all__ = ["RedisBackend"]


class RedisBackend:
    """The task store, event stream, queue manager and push-config store on one Redis.

    Args:
        redis: A ``redis.asyncio.Redis`` (``decode_responses=False``).
        prefix: Key namespace shared by every component (default ``"a2a"``).
        owner_resolver: Maps a call context to its owner (default: the user name).
        terminal_ttl: Seconds to keep a task after a terminal write; None keeps tasks.
        stream_retention: Cap and TTLs of the per-task event streams.
        lease_ttl: Seconds the lease of a task this replica runs lasts without renewal
            (after the replica dies, remote subscribers end within about this long).
        encryption_key: A Fernet key to encrypt push-notification configs at rest.
        durability: Replicas that must confirm every write before it is acknowledged
            (``WAIT``; see :class:`~a2a_redis.connection.durability.Durability`). None: no WAIT.
        max_payload_bytes: Largest encoded Task, event or push config written (8 MiB).
        cancel_timeout: Seconds to wait for the replica running a task to answer a
            forwarded cancel before recording CANCELED here (default 2).
        orphan_policy: ``"fail"`` (default): a survivor ends a dead replica's running tasks
            FAILED within ``3 * lease_ttl``; ``"keep"``: they stay as they were, and their
            subscribers get ``OwnerLostError``.
        push_options: Keyword arguments for the
            :class:`~a2a_redis.push.RedisPushNotificationSender` that ``request_handler``
            makes when the agent card declares push notifications (e.g. ``allow_hosts``).
    """

    def __init__(
        self,
        redis: Client,
        *,
        prefix: str = "a2a",
        owner_resolver: OwnerResolver = resolve_user_scope,
        terminal_ttl: float | None = None,
        stream_retention: StreamRetention | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        encryption_key: bytes | str | None = None,
        durability: Durability | None = None,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        cancel_timeout: float = DEFAULT_CANCEL_TIMEOUT,
        orphan_policy: str = "fail",
        push_options: dict[str, Any] | None = None,
    ) -> None:
        if durability is not None and durability.waits and is_cluster(redis):
            # Scripted writes (publish, queue appends, push configs) would need their WAIT
            # on the slot's own connection; refuse now rather than at the first publish.
            raise ValueError("durability (WAIT) is not supported on Redis Cluster yet")
        self.redis = redis
        self._owns_client = False
        self.options = options = Options(
            prefix=prefix,
            owner_resolver=owner_resolver,
            terminal_ttl=terminal_ttl,
            stream_retention=stream_retention or StreamRetention(),
            lease_ttl=lease_ttl,
            durability=durability,
            max_payload_bytes=max_payload_bytes,
            cancel_timeout=cancel_timeout,
            orphan_policy=orphan_policy,
        )
        self.task_store = VersionedRedisTaskStore.from_options(redis, options)
        self.listener = StreamListener(redis, self.task_store.keys)
        self.leases = LeaseKeeper(redis, self.task_store.keys, ttl=lease_ttl)
        #: This replica's control channel (forwarded cancels) and orphan reaper; it starts
        #: at first use (a subscription, a lease, a request).
        self.control = ControlPlane(
            self.task_store.records,
            EventPlumbing(redis, options, listener=self.listener, leases=self.leases),
        )
        self.listener.on_use = self.leases.on_use = self._on_use
        self.event_stream = RedisTaskEventStream.from_options(
            redis, options, ledger=self.task_store.ledger, listener=self.listener,
            leases=self.leases,
        )  # fmt: skip
        self.queue_manager = RedisQueueManager.from_options(
            redis, options, listener=self.listener, leases=self.leases
        )
        self.push_config_store = RedisPushNotificationConfigStore.from_options(
            redis, options, encryption_key=encryption_key
        )
        #: Made by ``request_handler`` when the agent card declares push notifications.
        self.push_sender: RedisPushNotificationSender | None = None
        self._push_options = dict(push_options or {})

    def _on_use(self) -> None:
        self.control.ensure_started()
        if self.push_sender is not None:
            self.push_sender.ensure_started()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        max_connections: int = 64,
        pool_timeout: float = 10.0,
        socket_timeout: float = 10.0,
        socket_connect_timeout: float = 5.0,
        health_check_interval: float = 30.0,
        retries: int = 3,
        **options: Any,
    ) -> RedisBackend:
        """Connect to a Redis URL; the backend owns the client it creates.

        ``redis://``, ``rediss://`` (TLS) or ``unix://`` (password and db in it), a Redis
        Cluster: ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` for
        TLS; ``max_connections`` then bounds concurrent operations, each node's pool has
        that size, and ``pool_timeout`` is how long an operation waits for its turn), or
        ``redis+sentinel://`` and ``rediss+sentinel://`` through Sentinel (see
        :mod:`a2a_redis.connection.sentinel`).

        The backend owns the pool it creates: ``max_connections`` (default 64) shared by
        every component, waiting up to ``pool_timeout`` seconds for a free connection
        (one is held by the pub/sub listener). ``options`` go to :class:`RedisBackend`.
        A command that meets a closed connection is retried ``retries`` times (default 3)
        with a short jittered backoff. Nothing connects until first use; :meth:`ping` checks
        the server.
        """
        settings = PoolSettings(
            max_connections=max_connections,
            pool_timeout=pool_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            health_check_interval=health_check_interval,
            retries=retries,
        )
        backend = cls(client_from_url(url, settings), **options)
        backend._owns_client = True
        return backend

    @property
    def plain_task_store(self) -> RedisTaskStore:
        """The unversioned ``TaskStore`` over the same tasks (for the legacy handler)."""
        return self.task_store.as_task_store

    def request_handler(
        self,
        agent_executor: AgentExecutor,
        agent_card: AgentCard,
        *,
        legacy: bool = False,
        **handler_kwargs: Any,
    ) -> RequestHandler:
        """The SDK request handler wired to this backend.

        By default a :class:`~a2a_redis.handlers.v2.RedisRequestHandler` (the SDK's
        ``DefaultRequestHandler`` in cluster mode: versioned store + event stream); with
        ``legacy=True`` a :class:`~a2a_redis.handlers.legacy.RedisLegacyRequestHandler` (the
        SDK's ``LegacyRequestHandler``, with ``RedisTaskStore`` and ``RedisQueueManager``).
        Both forward a cancel to the replica running the task (``control``). Both get the
        push-config store unless ``handler_kwargs`` names another; other ``handler_kwargs``
        pass through. When ``agent_card`` declares push notifications, both also get
        :attr:`push_sender` (made here, once) as ``push_sender`` and its URL policy as
        ``push_url_validator``, unless ``handler_kwargs`` names them (the legacy handler's
        log has no versions: its events are delivered by stream position,
        ``push/positions.py``).
        """
        handler_kwargs.setdefault("push_config_store", self.push_config_store)
        push = agent_card.capabilities.push_notifications
        if push and "push_sender" not in handler_kwargs:
            if self.push_sender is None:
                self.push_sender = RedisPushNotificationSender(
                    self.redis, self.push_config_store, self.event_stream, **self._push_options
                )
            handler_kwargs["push_sender"] = self.push_sender
            handler_kwargs.setdefault("push_url_validator", self.push_sender.url_allowed)
            self.push_sender.ensure_started()  # when a loop runs; else at first use
        if legacy:
            return RedisLegacyRequestHandler(
                agent_executor=agent_executor,
                task_store=self.plain_task_store,
                agent_card=agent_card,
                queue_manager=self.queue_manager,
                control=self.control,
                versioned_store=self.task_store,
                **handler_kwargs,
            )
        return RedisRequestHandler(
            agent_executor=agent_executor,
            task_store=self.task_store,
            agent_card=agent_card,
            event_stream=self.event_stream,
            control=self.control,
            **handler_kwargs,
        )

    # -- probes --------------------------------------------------------------------------
    async def ping(self) -> float:
        """Round-trip time to Redis in milliseconds; ``RedisUnavailableError`` if down."""
        start = time.perf_counter()
        with redis_errors("ping", "PING"):
            await self.redis.ping()
        return (time.perf_counter() - start) * 1000

    async def health(self) -> dict[str, Any]:
        """Readiness: Redis reachable and its round trip, listener state, local counts."""
        report: dict[str, Any] = {"redis": True, "rtt_ms": None, "error": None}
        try:
            report["rtt_ms"] = round(await self.ping(), 3)
        except Exception as e:  # a probe reports, it does not raise
            report.update(redis=False, error=str(e))
        report["listener"] = self.listener.stats()
        report["queues"] = self.queue_manager.stats()
        report["leases"] = len(self.leases)
        report["control"] = self.control.stats()
        report["push"] = None if self.push_sender is None else self.push_sender.stats()
        report["ok"] = report["redis"] and (
            report["listener"]["connected"] or not report["listener"]["tasks"]
        )
        return report

    # -- lifecycle -----------------------------------------------------------------------
    async def aclose(self) -> None:
        """Release leases, stop the listener, and close the pool if this backend made it."""
        try:
            try:
                if self.push_sender is not None:
                    await self.push_sender.aclose()
                await self.control.aclose()
                await self.queue_manager.aclose()
                await self.leases.aclose()
            finally:
                await self.listener.aclose()
        finally:
            if self._owns_client:
                with contextlib.suppress(rex.ConnectionError, OSError):
                    await self.redis.aclose()

    async def __aenter__(self) -> RedisBackend:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
