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

Replicas. Each keeper is one replica, with a random id (``replica``) that leads every lease
token it writes (``<replica>-<nonce>:<ttl ms>``), so that any replica can tell which one
runs a task and forward it a cancel (``control.py``). While it holds leases, a replica
keeps two more things in Redis, written by the same renewal pipeline:

* its heartbeat deadline in ``keys.replicas`` (a zset scored by server time + ``ttl``);
* the ids of the tasks it runs in ``keys.replica_tasks(replica)``, added when a lease is
  taken or first held (a task newly held is written within one event-loop turn, not at
  the next renewal, so that a replica dying right after starting a task leaves a trace),
  removed when it is let go.

A replica whose deadline has passed is dead; ``orphans.py`` ends its running tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from a2a.types.a2a_pb2 import TaskState
from redis.typing import EncodableT

from a2a_redis import telemetry
from a2a_redis.connection.cluster import Client, is_cluster
from a2a_redis.errors import redis_errors
from a2a_redis.events.feed import wait_at_most
from a2a_redis.events.tokens import members, new_replica_id
from a2a_redis.log.codec import F_STATE, TERMINAL_STATES
from a2a_redis.log.event_log import HEARTBEAT
from a2a_redis.log.keys import Keys

__all__ = ["SETTLED_STATES", "LeaseKeeper"]

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
# instead once the record's state (field ARGV[6]) is settled (ARGV[8...], the first ARGV[7]
# of them terminal: -2 for those, -1 for the others), or the record is gone (the task was
# deleted: -1); a record that is not a hash (corrupt) settles nothing.
_RENEW = """local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
if KEYS[2] then
  local state = redis.pcall('HGET', KEYS[2], ARGV[6])
  if state == false then
    if held then redis.call('DEL', KEYS[1]) end
    return -1
  end
  for i = 8, #ARGV do
    if state == ARGV[i] then
      if held then redis.call('DEL', KEYS[1]) end
      if i - 8 < tonumber(ARGV[7]) then return -2 end
      return -1
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call(ARGV[5], ARGV[3], ARGV[4])
return 1"""


# The replica's heartbeat: its deadline in the replicas zset, by the server's clock (so that
# replicas' clocks need not agree). ARGV: replica id, ttl ms.
_HEARTBEAT = """local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return now"""


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
        replica: This replica's id (default: a fresh random one).

    Round trips: ``take`` 1, ``hold`` and ``drop`` 0, ``release`` 1; renewal one pipeline
    per ``ttl / 3`` for every lease of the process, and one for the tasks newly held in
    one event-loop turn.
    """

    def __init__(
        self, redis: Client, keys: Keys, *, ttl: float = 10.0, replica: str | None = None
    ) -> None:
        if ttl <= 0:
            raise ValueError("lease ttl must be positive seconds")
        self._redis = redis
        self._keys = keys
        self.ttl = ttl
        self.replica = replica or new_replica_id()
        keys.replica_tasks(self.replica)  # InvalidIdError for a malformed id
        self._ttl_ms = int(ttl * 1000)
        self._release = redis.register_script(_RELEASE)
        self._renew_script = redis.register_script(_RENEW)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._held: dict[str, _Lease] = {}
        self._fresh: set[str] = set()  # held, not yet renewed (nor in the replica's set)
        self._gone: set[str] = set()  # let go, still in the replica's set
        self._due = asyncio.Event()  # set when something fresh or gone awaits a write
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False
        terminal = sorted(TERMINAL_STATES)
        others = sorted(SETTLED_STATES - TERMINAL_STATES)
        self._settled: list[EncodableT] = [len(terminal)]
        self._settled += [b"%d" % state for state in [*terminal, *others]]
        self.renewals = 0  # renewal pipelines sent (for stats)
        #: Called whenever a lease is taken or held (the control plane starts itself there).
        self.on_use: Callable[[], None] | None = None
        #: Called with a task this replica holds whose record turned terminal under it
        #: (a cancel recorded elsewhere, the orphan reaper): the control plane stops the
        #: agent here, if it still runs.
        self.on_ended: Callable[[str], None] | None = None
        telemetry.observe("a2a_redis.leases.held", self, len)

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
        # Names this replica and this holding, and tells subscribers how long it lasts.
        return b"%s-%s:%d" % (self.replica.encode(), os.urandom(6).hex().encode(), self._ttl_ms)

    async def take(self, task_id: str) -> bytes:
        """Take ``task_id``'s lease now, whoever held it; return its token.

        One round trip: the lease, this replica's heartbeat and its set of tasks.
        """
        token = self._token()
        lease = self._keys.lease(task_id)
        self._gone.discard(task_id)
        with redis_errors("take the lease", lease):
            await self._write(register=[task_id], unregister=[], take=(lease, token))
        self._held[task_id] = _Lease(token, None)
        self._start()
        return token

    def hold(self, task_id: str) -> None:
        """Hold ``task_id``'s lease while its record is not settled.

        No round trip now: the lease is written by a pipeline sent at the end of this
        event-loop turn, shared by every task held in it.
        """
        if task_id not in self._held and not self._closed:
            self._held[task_id] = _Lease(self._token(), self._keys.task(task_id))
            self._gone.discard(task_id)
            self._fresh.add(task_id)
            self._due.set()
            self._start()

    async def hold_now(self, task_id: str) -> None:
        """Hold ``task_id``'s lease, and write it with this replica's registration now.

        One round trip the first time (nothing if held already), so that a replica that dies
        right after it starts a task leaves the trace the orphan reaper needs. Never
        raises: if Redis does not answer, the renewal loop writes it later.
        """
        if task_id in self._held or self._closed:
            return
        self.hold(task_id)
        try:
            await self._renew_once(full=False)
        except Exception as e:  # the loop retries it (the task is fresh again)
            logger.warning("registration of task %r failed: %s; retrying", task_id, e)
            self._due.set()

    def drop(self, task_id: str, token: bytes | None = None) -> bytes | None:
        """Stop renewing ``task_id``'s lease (it expires by itself); its token, if held.

        Given ``token``, only if the lease held is that one.
        """
        lease = self._held.get(task_id)
        if lease is None or (token is not None and lease.token != token):
            return None
        del self._held[task_id]
        self._fresh.discard(task_id)
        self._gone.add(task_id)
        return lease.token

    async def release(self, task_id: str, token: bytes) -> None:
        """Delete ``task_id``'s lease if it still holds ``token`` (one round trip).

        Call :meth:`drop` first to stop renewing it.
        """
        lease = self._keys.lease(task_id)
        self._gone.discard(task_id)
        with redis_errors("release the lease", lease):
            await self._write(register=[], unregister=[task_id], release=(lease, token))

    async def _write(
        self,
        *,
        register: list[str],
        unregister: list[str],
        take: tuple[str, bytes] | None = None,
        release: tuple[str, bytes] | None = None,
    ) -> None:
        """A lease taken or released, with the heartbeat and set changes: one round trip."""
        tasks = self._keys.replica_tasks(self.replica)
        beat: tuple[list[str], list[EncodableT]] = (
            [self._keys.replicas],
            [self.replica, self._ttl_ms],
        )
        if is_cluster(self._redis):  # one slot per command: concurrently
            calls: list[Awaitable[object]] = [self._heartbeat(keys=beat[0], args=beat[1])]
            if take is not None:
                calls.append(self._redis.set(take[0], take[1], px=self._ttl_ms))
            if register:
                calls.append(self._redis.sadd(tasks, *members(register)))
            if unregister:
                calls.append(self._redis.srem(tasks, *members(unregister)))
            if release is not None:
                calls.append(self._release(keys=[release[0]], args=[release[1]]))
            await asyncio.gather(*calls)
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            if take is not None:
                pipe.set(take[0], take[1], px=self._ttl_ms)
            await self._heartbeat(keys=beat[0], args=beat[1], client=pipe)
            if register:
                pipe.sadd(tasks, *members(register))
            if unregister:
                pipe.srem(tasks, *members(unregister))
            if release is not None:
                await self._release(keys=[release[0]], args=[release[1]], client=pipe)
            await pipe.execute()

    async def aclose(self) -> None:
        """Stop renewing; delete the leases still held (best effort, one round trip).

        A replica that closes while it still runs tasks leaves them registered with a
        deadline already passed, so that a survivor ends them at its next sweep; one that
        runs none removes itself from the replicas' zset.
        """
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        held, self._held = self._held, {}
        gone, self._gone = self._gone, set()
        self._fresh.clear()
        try:
            await self._write_goodbye(held, gone)
        except Exception as e:  # they expire by themselves
            logger.warning("releasing %d leases at close failed: %s", len(held), e)

    async def _write_goodbye(self, held: dict[str, _Lease], gone: set[str]) -> None:
        tasks = self._keys.replica_tasks(self.replica)
        releases = [([self._keys.lease(t)], [lease.token]) for t, lease in held.items()]
        if is_cluster(self._redis):  # no scripts in cluster pipelines
            calls: list[Awaitable[object]] = [self._release(keys=k, args=a) for k, a in releases]
            if gone:
                calls.append(self._redis.srem(tasks, *members(gone)))
            if held:
                calls.append(self._redis.zadd(self._keys.replicas, {self.replica: 0}))
            else:
                calls += [self._redis.zrem(self._keys.replicas, self.replica)]
            await asyncio.gather(*calls)
            if not held:
                await self._redis.delete(tasks)  # after the SREM: in its own slot, ordered
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args in releases:
                await self._release(keys=keys, args=args, client=pipe)
            if gone:
                pipe.srem(tasks, *members(gone))
            if held:
                pipe.zadd(self._keys.replicas, {self.replica: 0})
            else:
                pipe.zrem(self._keys.replicas, self.replica)
                pipe.delete(tasks)
            await pipe.execute()

    def _start(self) -> None:
        if self.on_use is not None:
            self.on_use()
        if not self._closed and (self._renewer is None or self._renewer.done()):
            self._renewer = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        """Renew every lease every ``ttl / 3``, and write newly held ones at once.

        Keeps going through outages (subscribers decide on their own); ends when no lease
        is held and nothing is left to unregister.
        """
        loop = asyncio.get_running_loop()
        next_full = loop.time() + self.ttl / 3
        while (self._held or self._gone) and not self._closed:  # (closed: if a cancel was lost)
            await wait_at_most(self._due, next_full - loop.time())
            self._due.clear()
            full = loop.time() >= next_full
            if full:
                next_full = loop.time() + self.ttl / 3
            try:
                await self._renew_once(full)
            except Exception as e:
                logger.warning("renewal of %d leases failed: %s", len(self._held), e)

    async def _renew_once(self, full: bool) -> None:
        """One pipeline: the leases (all, or the fresh ones), heartbeat and task set.

        A method of its own, so that nothing of the batch stays referenced while the loop
        sleeps.
        """
        names = list(self._held) if full else [t for t in self._fresh if t in self._held]
        batch = [(t, self._held[t]) for t in names]
        gone = list(self._gone)
        self._fresh.difference_update(names)
        self._gone.clear()
        self.renewals += 1
        try:
            results = await self._send_renewals(batch, gone)
        except BaseException:
            self._fresh.update(t for t in names if t in self._held)
            self._gone.update(gone)
            raise
        if any(isinstance(r, Exception) for r in results[len(batch) :]):
            self._gone.update(gone)
            logger.warning("replica %s: heartbeat or task set write failed", self.replica)
        for (task_id, lease), result in zip(batch, results, strict=False):
            if isinstance(result, Exception):  # this task's keys only (say, a corrupt lease)
                logger.warning("renewal of task %r's lease failed: %s", task_id, result)
            elif result in (-1, -2) and self._held.get(task_id) is lease:
                del self._held[task_id]  # the task settled, whoever wrote it
                self._gone.add(task_id)
                logger.debug("task %r settled: its lease is dropped", task_id)
                if result == -2 and self.on_ended is not None:
                    self.on_ended(task_id)  # ended elsewhere: an agent here must stop

    async def _send_renewals(self, batch: list[tuple[str, _Lease]], gone: list[str]) -> list[Any]:
        """The renewals' replies first (one per lease), then the heartbeat's and the set's."""
        calls = []
        for task_id, lease in batch:
            keys = [self._keys.lease(task_id)]
            if lease.record is not None:
                keys.append(lease.record)
            args: list[EncodableT] = [
                lease.token, self._ttl_ms, self._keys.wake(task_id), HEARTBEAT,
                self._keys.publish, F_STATE, *self._settled,
            ]  # fmt: skip
            calls.append((keys, args))
        tasks = self._keys.replica_tasks(self.replica)
        names = [task_id for task_id, _ in batch]
        beat_keys = [self._keys.replicas]
        beat_args: list[EncodableT] = [self.replica, self._ttl_ms]
        if is_cluster(self._redis):  # no scripts in cluster pipelines
            extra: list[Awaitable[object]] = [self._heartbeat(keys=beat_keys, args=beat_args)]
            if names:
                extra.append(self._redis.sadd(tasks, *members(names)))
            if gone:
                extra.append(self._redis.srem(tasks, *members(gone)))
            return await asyncio.gather(
                *(self._renew_script(keys=k, args=a) for k, a in calls),
                *extra,
                return_exceptions=True,
            )
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                await self._renew_script(keys=keys, args=args, client=pipe)
            await self._heartbeat(keys=beat_keys, args=beat_args, client=pipe)
            if names:
                pipe.sadd(tasks, *members(names))
            if gone:
                pipe.srem(tasks, *members(gone))
            return await pipe.execute(raise_on_error=False)
