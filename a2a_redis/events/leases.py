"""Liveness leases: which replica runs a task, renewed by one loop per process.

A replica that runs a task holds a lease on it: the key ``keys.lease(task_id)`` holding a
token ``<random hex>:<ttl ms>`` that expires after ``ttl``. Two components hold leases:

* the legacy ``RedisQueueManager``, while the task's event queue is open on this replica
  (taken at once: ``tap`` looks the lease up to find the queue);
* the cluster-mode ``RedisTaskEventStream``, while this replica publishes a running task's
  events (held from the first event of a running state until an event that ends or
  interrupts the task, costing no round trip: the next renewal writes it).

One loop per process renews every lease it holds every ``ttl / 3`` in one pipeline, and each
renewal publishes a heartbeat on the task's wake channel. A replica where a subscriber waits
therefore knows that the owner is alive without sending any command itself. If the owner
dies, the heartbeats stop: after ``ttl`` of silence a waiting subscriber raises
``OwnerLostError`` (cluster mode) and a remote tap closes (legacy).

A lease held for a running task also checks the task's record at each renewal: once the
record is terminal, or waiting for input or authentication, whoever wrote it (a FAILED
write that is never published, or a cancel from another replica), the lease is dropped.
So a lease never outlives its task by more than one renewal period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass

from a2a.types.a2a_pb2 import TaskState

from a2a_redis.connection.cluster import Client, is_cluster
from a2a_redis.errors import redis_errors
from a2a_redis.log.codec import F_STATE, TERMINAL_STATES
from a2a_redis.log.event_log import HEARTBEAT
from a2a_redis.log.keys import Keys

__all__ = ["SETTLED_STATES", "LeaseKeeper", "lease_ttl_of"]

logger = logging.getLogger(__name__)

#: States in which nobody runs a task: terminal, or waiting for the user.
SETTLED_STATES = frozenset(
    TERMINAL_STATES | {TaskState.TASK_STATE_INPUT_REQUIRED, TaskState.TASK_STATE_AUTH_REQUIRED}
)

_RELEASE = """if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0"""
# Renew the lease (or take it again if it expired, say in an outage longer than the TTL)
# and publish a heartbeat (ARGV[5]: PUBLISH, or SPUBLISH on a cluster); leave it alone if
# another replica holds the task now (0). Given the task record (KEYS[2]), drop the lease
# instead once the record's state (field ARGV[6]) is settled (-1); a record that is not a
# hash (corrupt) settles nothing.
_RENEW = """local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
if KEYS[2] then
  local state = redis.pcall('HGET', KEYS[2], ARGV[6])
  for i = 7, #ARGV do
    if state == ARGV[i] then
      if held then redis.call('DEL', KEYS[1]) end
      return -1
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call(ARGV[5], ARGV[3], ARGV[4])
return 1"""


def lease_ttl_of(token: bytes | None, default: float) -> float:
    """The owner's lease TTL in seconds, read from its lease token (``default`` if foreign)."""
    if not token:
        return default
    _, _, ttl_ms = token.rpartition(b":")
    valid = ttl_ms.isdigit() and len(ttl_ms) < 10 and int(ttl_ms) > 0  # (int(): 4,300 digits)
    return int(ttl_ms) / 1000 if valid else default


@dataclass(frozen=True, slots=True)
class _Lease:
    token: bytes
    record: str | None  # the task record whose settled state ends the lease (cluster mode)


class LeaseKeeper:
    """The leases this process holds, and the one loop that renews them all.

    Args:
        redis: The shared client; not owned.
        keys: The namespace's key builder.
        ttl: Seconds a lease lasts without renewal (default 10); renewed every ``ttl / 3``.

    Round trips: ``take`` 1, ``hold`` and ``drop`` 0, ``release`` 1; renewal one pipeline
    per ``ttl / 3`` for every lease of the process.
    """

    def __init__(self, redis: Client, keys: Keys, *, ttl: float = 10.0) -> None:
        if ttl <= 0:
            raise ValueError("lease ttl must be positive seconds")
        self._redis = redis
        self._keys = keys
        self.ttl = ttl
        self._ttl_ms = int(ttl * 1000)
        self._release = redis.register_script(_RELEASE)
        self._renew_script = redis.register_script(_RENEW)
        self._held: dict[str, _Lease] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False
        self._settled = [b"%d" % state for state in sorted(SETTLED_STATES)]

    def __len__(self) -> int:
        return len(self._held)

    @property
    def renewing(self) -> bool:
        """Whether the renewal loop runs (it ends when no lease is held, and at close)."""
        return self._renewer is not None and not self._renewer.done()

    def holds(self, task_id: str) -> bool:
        """Whether this process holds ``task_id``'s lease."""
        return task_id in self._held

    def _token(self) -> bytes:
        # Names this holding, and tells subscribers how long the owner's lease lasts.
        return b"%s:%d" % (os.urandom(8).hex().encode(), self._ttl_ms)

    async def take(self, task_id: str) -> bytes:
        """Take ``task_id``'s lease now (one SET), whoever held it; return its token."""
        token = self._token()
        lease = self._keys.lease(task_id)
        with redis_errors("take the lease", lease):
            await self._redis.set(lease, token, px=self._ttl_ms)
        self._held[task_id] = _Lease(token, None)
        self._start()
        return token

    def hold(self, task_id: str) -> None:
        """Hold ``task_id``'s lease while its record is not settled (no round trip now)."""
        if task_id not in self._held and not self._closed:
            self._held[task_id] = _Lease(self._token(), self._keys.task(task_id))
            self._start()

    def drop(self, task_id: str, token: bytes | None = None) -> bytes | None:
        """Stop renewing ``task_id``'s lease (it expires by itself); its token, if held.

        Given ``token``, only if the lease held is that one.
        """
        lease = self._held.get(task_id)
        if lease is None or (token is not None and lease.token != token):
            return None
        del self._held[task_id]
        return lease.token

    async def release(self, task_id: str, token: bytes) -> None:
        """Delete ``task_id``'s lease if it still holds ``token`` (one round trip).

        Call :meth:`drop` first to stop renewing it.
        """
        lease = self._keys.lease(task_id)
        with redis_errors("release the lease", lease):
            await self._release(keys=[lease], args=[token])

    async def aclose(self) -> None:
        """Stop renewing; delete the leases still held (best effort, one pipeline)."""
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        held, self._held = self._held, {}
        if not held:
            return
        try:
            if is_cluster(self._redis):  # no scripts in cluster pipelines
                await asyncio.gather(
                    *(
                        self._release(keys=[self._keys.lease(t)], args=[lease.token])
                        for t, lease in held.items()
                    )
                )
                return
            async with self._redis.pipeline(transaction=False) as pipe:
                for task_id, lease in held.items():
                    await self._release(
                        keys=[self._keys.lease(task_id)], args=[lease.token], client=pipe
                    )
                await pipe.execute()
        except Exception as e:  # they expire by themselves
            logger.warning("releasing %d leases at close failed: %s", len(held), e)

    def _start(self) -> None:
        if not self._closed and (self._renewer is None or self._renewer.done()):
            self._renewer = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        """Every ``ttl / 3``: renew every lease and send its heartbeat, in one pipeline.

        Keeps going through outages (subscribers decide on their own); ends when no lease
        is held.
        """
        while self._held and not self._closed:  # (closed: even if a cancel was lost)
            await asyncio.sleep(self.ttl / 3)
            try:
                await self._renew_once()
            except Exception as e:
                logger.warning("renewal of %d leases failed: %s", len(self._held), e)

    async def _renew_once(self) -> None:
        """One pipeline renewing every lease held.

        A method of its own, so that nothing of the batch stays referenced while the loop
        sleeps.
        """
        batch = list(self._held.items())
        calls = []
        for task_id, lease in batch:
            keys = [self._keys.lease(task_id)]
            if lease.record is not None:
                keys.append(lease.record)
            args: list[bytes | str | int] = [
                lease.token, self._ttl_ms, self._keys.wake(task_id), HEARTBEAT,
                self._keys.publish, F_STATE, *self._settled,
            ]  # fmt: skip
            calls.append((keys, args))
        if is_cluster(self._redis):  # no scripts in cluster pipelines
            results = await asyncio.gather(
                *(self._renew_script(keys=k, args=a) for k, a in calls), return_exceptions=True
            )
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    await self._renew_script(keys=keys, args=args, client=pipe)
                results = await pipe.execute(raise_on_error=False)
        for (task_id, lease), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):  # this task's keys only (say, a corrupt lease)
                logger.warning("renewal of task %r's lease failed: %s", task_id, result)
            elif result == -1 and self._held.get(task_id) is lease:
                del self._held[task_id]  # the task settled, whoever wrote it
                logger.debug("task %r settled: its lease is dropped", task_id)
