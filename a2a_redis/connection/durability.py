"""``Durability``: how many replicas must confirm a write before a2a-redis acknowledges it.

Redis replicates asynchronously: the primary answers a write before any replica has it. If
the primary dies before replicating it, a failover (Sentinel) promotes a replica that never
saw it, and the write is lost although it was acknowledged. ``Durability(replicas=N,
timeout=T)`` makes every write a2a-redis acknowledges wait for ``WAIT N T`` on the same
connection, in the same round trip: task-store saves and deletes, event appends
(``publish``, ``destroy``), legacy-queue appends and close marks, push-config writes.
Fewer than N confirmations within T raise :class:`~a2a_redis.errors.ReplicationTimeoutError`
(the write is applied on the primary, not rolled back). ``WAIT`` makes a write survive the
loss of the primary; it does not make it durable on disk (that is the servers' AOF).

Pipelined, the ``WAIT`` also follows a transaction that did not apply (a lost race, or a
server that had not loaded our script): with too few replicas, that attempt costs the
timeout too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis import exceptions as rex
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from a2a_redis import telemetry
from a2a_redis.connection.cluster import Client, is_cluster
from a2a_redis.errors import ReplicationTimeoutError

__all__ = ["Durability", "run_script"]


@dataclass(frozen=True, slots=True)
class Durability:
    """Replicas that must confirm each acknowledged write (``WAIT numreplicas timeout``).

    Attributes:
        replicas: Replicas that must have the write before it is acknowledged. 0 (the
            default) sends no ``WAIT``: a write is acknowledged once the primary applied it.
        timeout: Seconds ``WAIT`` may block (default 1.0). It lengthens the read deadline
            of the round trip it ends; keep it below the client's ``socket_timeout``.
    """

    replicas: int = 0
    timeout: float = 1.0

    def __post_init__(self) -> None:
        if self.replicas < 0 or not self.timeout > 0:
            raise ValueError(f"invalid durability {self!r}: replicas >= 0, timeout > 0 seconds")

    @property
    def waits(self) -> bool:
        """Whether writes end with a ``WAIT``."""
        return self.replicas > 0

    def wait_command(self) -> tuple[bytes, int, int]:
        """The ``WAIT`` command (its timeout in milliseconds, never 0: that blocks forever)."""
        return (b"WAIT", self.replicas, max(1, round(self.timeout * 1000)))

    def check(self, acked: Any, key: str | None) -> None:
        """Raise ``ReplicationTimeoutError`` unless ``acked`` (WAIT's reply) is enough."""
        if isinstance(acked, Exception):
            raise acked
        if int(acked) < self.replicas:
            raise ReplicationTimeoutError(
                f"write applied on the primary but confirmed by {int(acked)} of the "
                f"{self.replicas} replicas required within {self.timeout}s (WAIT); it is not "
                "rolled back, and is lost if the primary fails before replicating it",
                key=key,
                acked=int(acked),
                required=self.replicas,
            )


async def run_script(
    redis: Client,
    script: AsyncScript,
    keys: Sequence[Any],
    args: Sequence[Any],
    durability: Durability | None,
    key: str,
) -> Any:
    """Run ``script`` (EVALSHA, loaded on NOSCRIPT); then ``WAIT`` if ``durability`` asks.

    One round trip either way: EVALSHA and WAIT are pipelined on one connection (WAIT
    counts replicas that have this connection's last write). Raises
    ``ReplicationTimeoutError`` naming ``key`` when too few replicas confirm.
    """
    telemetry.round_trip()
    if durability is None or not durability.waits:
        return await script(keys=keys, args=args)
    if is_cluster(redis):  # WAIT must follow on the slot's own connection: not done yet
        raise ValueError("durability (WAIT) is not supported on Redis Cluster yet")
    assert isinstance(redis, Redis)
    socket_timeout = redis.connection_pool.connection_kwargs.get("socket_timeout")
    if socket_timeout is not None and durability.timeout >= socket_timeout:
        # the WAIT reply would time out the read, and a retry would write twice
        raise ValueError(
            f"durability timeout {durability.timeout}s must be below the client's "
            f"socket_timeout {socket_timeout}s"
        )
    for _ in range(2):
        async with redis.pipeline(transaction=False) as pipe:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            pipe.execute_command(*durability.wait_command())
            reply, acked = await pipe.execute(raise_on_error=False)
        if isinstance(reply, rex.NoScriptError):
            await redis.script_load(script.script)
            continue
        if isinstance(reply, Exception):
            raise reply
        durability.check(acked, key)
        return reply
    raise rex.NoScriptError(f"the script {script.sha} was flushed again as soon as loaded")
