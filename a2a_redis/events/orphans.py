"""The orphan reaper: a survivor ends the running tasks of a replica that died.

Every replica that holds leases keeps its heartbeat deadline in ``keys.replicas`` and the
ids of its tasks in ``keys.replica_tasks(replica)`` (``leases.py``). Each replica sweeps
once per ``lease_ttl`` (jittered): one script reads, by the server's clock, up to
:data:`DEAD_PAGE` replicas whose deadline passed. That is the whole steady-state cost: one
command per replica per ``lease_ttl``, whatever the number of tasks, with no KEYS or SCAN;
it works on a single server, Sentinel and Redis Cluster alike.

For a dead replica, the sweeper first claims it (``SET keys.reaper(r) NX PX``), so that
usually one survivor does the work; then, :data:`REAP_BATCH` tasks per sweep, it reads each
task's lease:

* held by another replica: the task moved (a follow-up ran it elsewhere); it is forgotten;
* still held by the dead replica: it is not dead after all (its heartbeat write failed);
  the task is left alone;
* absent: if the task is SUBMITTED or WORKING, it is written FAILED through the normal
  versioned write (the version read must still be current, so of two sweepers racing,
  exactly one write lands), with a status message saying that the replica running it was
  lost. The FAILED event goes to the task's stream, so every subscriber on every replica
  gets it as a clean last event; a close mark follows it for the legacy queue's taps.

Under ``orphan_policy="keep"`` the sweep only forgets dead replicas; their tasks stay as they
were. A replica that was only slow and comes back finds its task FAILED: its next write is
refused (the task is terminal), which stops its agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from datetime import datetime, timezone
from typing import cast

from a2a.server.cluster import ConcurrentTaskModificationError
from a2a.types.a2a_pb2 import (
    Message,
    Part,
    Role,
    Task,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)

from a2a_redis.errors import A2ARedisError, redis_errors
from a2a_redis.events.plumbing import EventPlumbing
from a2a_redis.events.tokens import members as lease_members
from a2a_redis.events.tokens import replica_of, task_of
from a2a_redis.log.codec import RecordHead
from a2a_redis.log.event_log import close_commands
from a2a_redis.stores.records import TaskRecords

__all__ = ["LOST_REPLICA_TEXT", "OrphanReaper"]

logger = logging.getLogger(__name__)

#: Dead replicas read per sweep, and tasks of one dead replica handled per sweep.
DEAD_PAGE = 8
REAP_BATCH = 100
#: The states in which a task has a running agent.
RUNNING_STATES = frozenset({TaskState.TASK_STATE_SUBMITTED, TaskState.TASK_STATE_WORKING})
LOST_REPLICA_TEXT = (
    "The server replica running this task was lost (its lease lapsed); "
    "another replica ended the task. Send the request again to retry."
)
#: The close mark's token for the legacy queues' taps (it names no opening of a queue).
_REAPER_TOKEN = b"reaper"

_DEAD = """local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))"""


# Claim a dead replica for this sweeper (ARGV[1]) for ARGV[2] ms, or keep our own claim.
_CLAIM = """local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1"""


class OrphanReaper:
    """Sweeps for dead replicas once per lease TTL and ends their running tasks.

    Args:
        records: The task record engine (the store's), to read and write tasks unscoped.
        log: The event plumbing (keys, options, the lease keeper), shared with the stream.
    """

    def __init__(self, records: TaskRecords, log: EventPlumbing) -> None:
        self._records = records
        self._log = log
        self._keys = log.keys
        self._leases = log.leases
        self._fail = log.options.orphan_policy == "fail"
        self._dead = records.redis.register_script(_DEAD)
        self._claim = records.redis.register_script(_CLAIM)
        self._task: asyncio.Task[None] | None = None
        self.sweeps = 0
        self.replicas_reaped = 0
        self.tasks_failed = 0

    @property
    def interval(self) -> float:
        """Seconds between sweeps (the lease TTL)."""
        return self._leases.ttl

    def start(self) -> None:
        """Start sweeping in the running event loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def aclose(self) -> None:
        """Stop sweeping."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval * random.uniform(0.8, 1.0))
            try:
                await self.sweep()
            except A2ARedisError as e:
                logger.warning("orphan sweep failed: %s; next in %.1fs", e, self.interval)

    async def sweep(self) -> int:
        """One sweep: the dead replicas' running tasks this replica ended (a count)."""
        self.sweeps += 1
        replicas = self._keys.replicas
        with redis_errors("read dead replicas", replicas):
            dead = cast(list[bytes], await self._dead(keys=[replicas], args=[DEAD_PAGE]))
        ended = 0
        for raw in dead:
            replica = raw.decode()
            if replica == self._leases.replica:
                continue  # our own deadline lapsed (a long pause): our next renewal fixes it
            claim = self._keys.reaper(replica)
            with redis_errors("claim a dead replica", claim):
                mine = await self._claim(
                    keys=[claim], args=[self._leases.replica, int(self.interval * 2000)]
                )
            if mine:
                ended += await self._reap(replica)
        return ended

    async def _reap(self, replica: str) -> int:
        """End up to REAP_BATCH of ``replica``'s running tasks; forget it once none is left."""
        redis = self._records.redis
        tasks = self._keys.replica_tasks(replica)
        with redis_errors("read a dead replica's tasks", tasks):
            members = cast(list[bytes], await redis.srandmember(tasks, REAP_BATCH))
            if not members:
                # Nothing left: forget it (if it came back meanwhile, its renewal re-adds it).
                await redis.zrem(self._keys.replicas, replica)
                await redis.delete(self._keys.reaper(replica))
                self.replicas_reaped += 1
                return 0
        task_ids = [task_of(m) for m in members]
        tokens = await self._leases_of(task_ids)
        done: list[str] = []
        ended = 0
        for task_id, token in zip(task_ids, tokens, strict=True):
            holder = replica_of(token)
            if token is not None and holder == replica:
                continue  # its lease still lives: not dead after all
            if token is None and self._fail and await self._end(task_id):
                ended += 1
            done.append(task_id)
        if done:
            with redis_errors("forget a dead replica's tasks", tasks):
                await redis.srem(tasks, *lease_members(done))
        self.tasks_failed += ended
        return ended

    async def _leases_of(self, task_ids: list[str]) -> list[bytes | None]:
        lease_keys = [self._keys.lease(t) for t in task_ids]
        with redis_errors("read leases", lease_keys[0]):
            if self._keys.sharded:  # one slot per key: concurrently
                redis = self._records.redis
                found = await asyncio.gather(*(redis.get(k) for k in lease_keys))
                return cast(list[bytes | None], list(found))
            async with self._records.redis.pipeline(transaction=False) as pipe:
                for key in lease_keys:
                    pipe.get(key)
                return cast(list[bytes | None], await pipe.execute())

    async def _end(self, task_id: str) -> bool:
        """Write FAILED if the task still runs at the version read; whether it did."""
        try:
            found = await self._records.read_any(task_id)
        except A2ARedisError as e:  # a corrupt record: say so, leave it
            logger.warning("orphan %r cannot be read: %s", task_id, e)
            return False
        if found is None:
            return False
        owner, task, version = found
        if task.status.state not in RUNNING_STATES:
            return False
        status = TaskStatus(
            state=TaskState.TASK_STATE_FAILED,
            message=Message(
                message_id=str(uuid.uuid4()),
                role=Role.ROLE_AGENT,
                task_id=task.id,
                context_id=task.context_id,
                parts=[Part(text=LOST_REPLICA_TEXT)],
            ),
        )
        status.timestamp.FromDatetime(datetime.now(timezone.utc))
        failed = Task()
        failed.CopyFrom(task)
        failed.status.CopyFrom(status)
        event = TaskStatusUpdateEvent(task_id=task.id, context_id=task.context_id, status=status)

        def decide(old: RecordHead | None) -> int:
            if old is None or old.version != version:
                raise ConcurrentTaskModificationError(task_id)
            return version + 1

        try:
            await self._records.write(failed, owner, event, decide)
        except ConcurrentTaskModificationError:
            return False  # written meanwhile (another sweeper, a follow-up, the owner)
        retention = self._log.options.stream_retention
        commands = close_commands(self._keys, task_id, token=_REAPER_TOKEN, retention=retention)
        await self._log.run("close the queue", task_id, commands)
        logger.warning("task %r: its replica was lost; ended FAILED", task_id)
        return True
