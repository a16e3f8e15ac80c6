"""``TaskRecords``: the record engine both task stores share: read, optimistic write, delete.

A task is a hash (``codec.encode_record``); every write is an optimistic transaction (WATCH
+ read, then MULTI/EXEC, see ``connection/transaction.py``) that also keeps the owner's
ListTasks indexes (``task_index.py``) and, when the write carries an event, appends it to the
task's event log with its version. A terminal state is final: a write that would change a
stored terminal state is refused (``TerminalStateError``), decided on the record read under
WATCH, so the EXEC that would follow any change to it aborts. Writes are retried a bounded
number of times (``Options.max_attempts``), never in an unbounded loop as redis-py's
``transaction()`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import cast

from a2a.server.events.event_queue import Event
from a2a.types.a2a_pb2 import Task
from a2a.utils.proto_utils import to_stream_response
from redis import exceptions as rex

from a2a_redis import telemetry
from a2a_redis.connection.cluster import Client, SlotMovedError, is_cluster
from a2a_redis.connection.transaction import (
    FALLBACK,
    Batch,
    Command,
    WatchedTransaction,
    backoff,
    bulk,
    call_packed,
)
from a2a_redis.errors import (
    A2ARedisError,
    ContentionError,
    RedisUnavailableError,
    TaskOwnedElsewhereError,
    TerminalStateError,
    raise_if_pool_exhausted,
    redis_errors,
    require_binary_client,
)
from a2a_redis.log.codec import (
    F_CONTEXT,
    F_EXPIRES,
    F_OWNER,
    F_SCHEMA,
    F_VERSION,
    F_WRITE,
    HEAD_FIELDS,
    TERMINAL_STATES,
    RecordHead,
    check_payload_size,
    decode_head,
    decode_stored,
    encode_event,
    encode_record,
    index_member,
)
from a2a_redis.log.event_log import AppendLedger, append_commands, destroy_commands, pack_entry
from a2a_redis.log.keys import Keys
from a2a_redis.options import Options
from a2a_redis.stores.save_body import READ_FIELDS, Frame, save_batch
from a2a_redis.stores.task_index import TaskIndex

__all__ = ["Decide", "TaskRecords"]

logger = logging.getLogger(__name__)

#: Decides the new version from the stored record (None: absent), or raises.
Decide = Callable[[RecordHead | None], int]

_CACHED = 4096  # tasks whose keys are kept packed (until they end, or are deleted)
#: Fields a write can leave out when the stored record has the same value: the schema
#: (a record read under WATCH has the current one), the owner (checked equal), and these.
_KEPT = {F_SCHEMA: True, F_OWNER: True}
#: A stream entry's fields, but for the version (set by each attempt).
Entry = dict[bytes, bytes]


class TaskRecords:
    """The record engine both stores share: read, optimistic write, delete.

    Args:
        redis: The shared client (``decode_responses=False``); not owned.
        options: The namespace's shared options.
    """

    def __init__(self, redis: Client, options: Options) -> None:
        require_binary_client(redis)
        self.redis = redis
        self.options = options
        self.keys = Keys.for_client(redis, options.prefix)
        self.owner_resolver = options.owner_resolver
        self.terminal_ttl = options.terminal_ttl
        self.retention = options.stream_retention
        self.max_attempts = options.max_attempts
        self.max_payload_bytes = options.max_payload_bytes
        self.durability = options.durability
        self.index = TaskIndex(redis, self.keys, split=is_cluster(redis))
        #: Events this store appended, which ``publish`` then need not (shared with the stream).
        self.ledger = AppendLedger()
        self._frames: dict[str, Frame] = {}
        ttls = (self.retention.idle_ttl, self.retention.terminal_ttl)
        self._ttls = tuple(bulk(b"%d" % int(ttl * 1000)) for ttl in ttls)  # stream TTL (ms)

    def _frame(self, task_id: str, keep: bool = True) -> Frame:
        """The task's packed keys (``InvalidIdError`` for an over-long id).

        Kept (``keep``) for the tasks this replica writes, until they end or are deleted;
        a read alone does not keep them, so a replica that only serves reads holds none.
        """
        frame = self._frames.get(task_id)
        if frame is None:
            frame = Frame(self.keys, task_id, self.retention.maxlen)
            if keep:
                if len(self._frames) >= _CACHED:
                    self._frames.clear()
                self._frames[task_id] = frame
        return frame

    # -- read ----------------------------------------------------------------------------
    async def read(self, task_id: str, owner: str) -> tuple[Task, int] | None:
        """The owner's task and its version, or None. One round trip (HMGET)."""
        self.keys.expiring(owner)  # an over-long owner raises InvalidIdError, as everywhere
        stored = await self.read_any(task_id)
        if stored is None or stored[0] != owner:
            return None
        return stored[1], stored[2]

    async def read_any(self, task_id: str) -> tuple[str, Task, int] | None:
        """Whoever owns it: the task's owner, the task and its version, or None.

        For the replicas' own bookkeeping (the orphan reaper), never for a caller's request.
        """
        frame = self._frame(task_id, keep=False)
        key = frame.key
        with redis_errors("get task", key):
            row = await call_packed(self.redis, frame.read)
            if row is FALLBACK:
                telemetry.round_trip()  # (redis-py's, on a cluster)
                row = await self.redis.hmget(key, list(READ_FIELDS))
            elif isinstance(row, rex.ResponseError):
                raise row
        return decode_stored(key, task_id, cast("list[bytes | None]", row))

    # -- write ---------------------------------------------------------------------------
    def _write_commands(
        self,
        frame: Frame,
        task: Task,
        payload: bytes,
        owner: str,
        version: int,
        write_id: bytes,
        old: RecordHead | None,
        entry: Entry | None,
        history: Sequence[tuple[int, Event]] = (),
    ) -> tuple[Batch, list[Command], int]:
        """The write's body in the task's slot, its index commands, and its expiry.

        ``entry`` is the event's stream entry (its version is set here). Index changes
        join the body on one server; on a cluster they run after it in the owner's slot
        (``task_index.py``), and are returned.
        """
        terminal = task.status.state in TERMINAL_STATES
        expires_at = 0
        if terminal and self.terminal_ttl is not None:
            expires_at = int(time.time() * 1000 + self.terminal_ttl * 1000)
        member = index_member(task)
        record = encode_record(
            task, payload, owner=owner, version=version, write_id=write_id,
            expires_at=expires_at, member=member,
        )  # fmt: skip
        state = task.status.state
        head = RecordHead(owner, version, task.context_id, state, member, write_id, expires_at)
        frame.wrote(record, head)
        if old is not None:  # the record exists: write only the fields that change
            kept = {**_KEPT, F_CONTEXT: old.context_id == task.context_id}
            kept[F_EXPIRES] = old.expires_at == expires_at
            record = {name: value for name, value in record.items() if not kept.get(name, False)}
        index_cmds: list[Command] = []
        moves: tuple[list[bytes], list[bytes], list[bytes]] = ([], [], [])
        if self.index.split:
            index_cmds = self.index.index_commands(owner, old, task, member, expires_at)
        else:
            gone, added = self.index.moves(owner, old, task, member)
            moves = (  # (key, packed key) pairs: packed keys, each once
                [p for k, p in gone if (k, p) in added],
                [p for k, p in gone if (k, p) not in added],
                [p for k, p in added if (k, p) not in gone],
            )
        wake = b""
        if entry is not None:
            entry = {**entry, F_VERSION: b"%d" % version}
            wake = pack_entry(entry)
        members = (old.member if old is not None else b"", member)
        batch = save_batch(frame, record, moves, members, entry, wake, self._ttls[terminal])
        key, push = frame.key, frame.push  # the task's push configs share its lifetime
        if expires_at:
            batch.add(("PEXPIREAT", key, expires_at))
            batch.add(("PEXPIREAT", push, expires_at))
        elif old is not None and old.expires_at:
            batch.add(("PERSIST", key))
            batch.add(("PERSIST", push))
        if not self.index.split:
            for command in self.index.expiry_commands(owner, old, task, member, expires_at):
                batch.add(command)
        for at, past in history:  # an import: events the stream does not hold yet
            if old is None or at > old.version:
                for command in append_commands(
                    self.keys, task.id, at, past, terminal=terminal, retention=self.retention,
                    max_bytes=self.max_payload_bytes,
                ):  # fmt: skip
                    batch.add(command)
        return batch, index_cmds, expires_at

    def _encode(
        self,
        key: str,
        task: Task,
        owner: str,
        event: Event | None,
        history: Sequence[tuple[int, Event]],
    ) -> tuple[bytes, Entry | None]:
        """The task's payload and the event's entry (each attempt sets its version).

        Refuses what cannot be written before any round trip: over-long ids, big payloads.
        """
        payload = task.SerializeToString()
        self.index.packed_keys(owner, task.context_id, task.status.state)
        check_payload_size(key, "task", len(payload), self.max_payload_bytes)
        stream = self._frame(task.id).events
        entry = None
        if event is not None:
            entry = encode_event(0, event, key=stream, limit=self.max_payload_bytes)
        for _, past in history:
            size = to_stream_response(past).ByteSize()
            check_payload_size(stream, "event", size, self.max_payload_bytes)
        return payload, entry

    async def write(
        self,
        task: Task,
        owner: str,
        event: Event | None,
        decide: Decide,
        *,
        history: Sequence[tuple[int, Event]] = (),
    ) -> int:
        """Write ``task`` for ``owner`` at the version ``decide`` picks; return that version.

        ``history`` is for imports only (``ops/migrate.py``): (version, event) pairs copied
        from another store, appended in the same MULTI, those newer than the stored record
        only, so that an import repeated or resumed never logs an event twice.

        Round trips: 2 per attempt (WATCH + HMGET; MULTI ... EXEC), +1 (UNWATCH) when
        the write is refused (by ``decide``, or because it would change a stored terminal
        state: :class:`TerminalStateError`), +1-2 after a terminal write with a TTL (purge of
        expired index entries); on a cluster +1 (the index update after the commit; the
        pending index intent travels with the first WATCH).
        A lost race (EXEC aborted), a transient connection error or a slot move is
        retried, with jittered backoff, up to ``max_attempts`` times; each attempt re-reads
        and decides again, so a conflict is reported as soon as the re-read shows one. A
        random write id stored with the record makes a retry after a lost EXEC reply
        recognise its own committed write instead of reporting a conflict.
        """
        key = self._frame(task.id).key
        payload, entry = self._encode(key, task, owner, event, history)
        write_id = os.urandom(8)
        intent = self.index.intent(task.id, write_id) if self.index.split else b""
        # On a cluster the pending intent goes out with the first WATCH; commits wait for it.
        intent_set = asyncio.ensure_future(self.index.begin(owner, intent)) if intent else None
        index_cmds: list[Command] = []
        outcome_known = True  # False while a commit may have happened unseen (a list repairs)
        try:
            for attempt in range(1, self.max_attempts + 1):
                try:
                    committed = await self._attempt(
                        key, task, payload, owner, entry, decide, write_id, intent_set, history
                    )
                except (rex.ConnectionError, rex.TimeoutError) as e:
                    raise_if_pool_exhausted(e, "save", key)
                    if attempt == self.max_attempts:
                        outcome_known = False
                        raise RedisUnavailableError(
                            f"Redis unavailable during save: {e}", key=key
                        ) from e
                    logger.warning(
                        "save of task %r: %s; retrying (attempt %d)", task.id, e, attempt
                    )
                    await backoff(attempt, cap=0.5 if isinstance(e, SlotMovedError) else 0.05)
                    continue
                if committed is not None:
                    version, expires_at, index_cmds = committed
                    break
                logger.debug("save of task %r lost a race (attempt %d)", task.id, attempt)
                await backoff(attempt)
            else:
                raise ContentionError(
                    f"save of task {task.id!r} lost {self.max_attempts} optimistic "
                    "transactions in a row",
                    key=key,
                )
        finally:
            if intent_set is not None:
                with contextlib.suppress(Exception):
                    await intent_set  # never clear an intent before it is set
            if intent and outcome_known:  # committed: apply the index change; else clear it
                await self.index.finish(owner, intent, index_cmds)
        if event is not None:
            self.ledger.record(task.id, version)
        if task.status.state in TERMINAL_STATES:  # a finished task rarely writes again
            self._frames.pop(task.id, None)
        if expires_at:  # best effort: the save has committed whatever happens here
            try:
                await self.index.purge_expired(owner)
            except A2ARedisError as e:
                logger.warning("purge of expired index entries failed: %s", e)
        return version

    async def _attempt(
        self,
        key: str,
        task: Task,
        payload: bytes,
        owner: str,
        entry: Entry | None,
        decide: Decide,
        write_id: bytes,
        intent_set: asyncio.Future[None] | None,
        history: Sequence[tuple[int, Event]] = (),
    ) -> tuple[int, int, list[Command]] | None:
        """One optimistic transaction: (version, expiry, index commands), None if it lost.

        The index commands are those still to run after the commit (on a cluster).
        """
        frame = self._frame(task.id)
        with redis_errors("save task", key, connection=False):
            async with WatchedTransaction(self.redis, key, self.durability) as tx:
                (raw,) = await tx.watch_packed(frame.watch, 1)
                try:
                    old = frame.decode(raw)
                    if old is not None and old.write_id == write_id:
                        # An earlier attempt committed; its reply was lost. With durability,
                        # rewrite its write id so that WAIT (on this connection) confirms it.
                        if self.durability is not None and self.durability.waits:
                            await tx.commit([("HSET", key, F_WRITE, write_id)])
                        else:
                            await tx.unwatch()
                        index_cmds = []
                        if self.index.split:  # index the committed state (repairs the rest)
                            index_cmds = self.index.index_commands(
                                owner, None, task, old.member, old.expires_at
                            )
                        return old.version, old.expires_at, index_cmds
                    if old is not None and old.owner != owner:
                        raise TaskOwnedElsewhereError(
                            "task id is held by another owner; refusing to overwrite", key=key
                        )
                    if (
                        old is not None
                        and old.state in TERMINAL_STATES
                        and task.status.state != old.state
                    ):
                        raise TerminalStateError(
                            task.id, key=key, stored_state=old.state,
                            refused_state=task.status.state,
                        )  # fmt: skip
                    version = decide(old)
                except BaseException:
                    await tx.unwatch()
                    raise
                cmds, index_cmds, expires_at = self._write_commands(
                    frame, task, payload, owner, version, write_id, old, entry, history
                )
                if intent_set is not None:
                    await intent_set  # the pending intent is set before anything commits
                if await tx.commit(cmds) is None:
                    return None
                return version, expires_at, index_cmds

    # -- delete --------------------------------------------------------------------------
    async def remove(self, task_id: str, owner: str) -> None:
        """Delete the owner's task: record, stream, push configs and state, index entries.

        Atomically; on a cluster the index entries just after (see ``task_index.py``).
        """
        key = self.keys.task(task_id)
        self.keys.expiring(owner)  # an over-long owner raises InvalidIdError, as everywhere
        self._frames.pop(task_id, None)
        intent = self.index.intent(task_id, os.urandom(8)) if self.index.split else b""
        if intent:
            await self.index.begin(owner, intent)
        index_cmds: list[Command] = []
        outcome_known = True
        try:
            for attempt in range(1, self.max_attempts + 1):
                try:
                    with redis_errors("delete task", key, connection=False):
                        async with WatchedTransaction(self.redis, key, self.durability) as tx:
                            (raw,) = await tx.watch([key], [("HMGET", key, *HEAD_FIELDS)])
                            old = decode_head(key, raw)
                            if old is None or old.owner != owner:
                                await tx.unwatch()
                                return
                            cmds: list[Command] = [
                                (
                                    "UNLINK",
                                    key,
                                    self.keys.push_configs(task_id),
                                    self.keys.push_state(task_id),
                                ),
                                *destroy_commands(self.keys, task_id),
                            ]
                            changes = self.index.index_commands(owner, old, None)
                            if not self.index.split:
                                cmds += changes
                            if await tx.commit(cmds) is not None:
                                index_cmds = changes if self.index.split else []
                                return
                except SlotMovedError as e:
                    if attempt == self.max_attempts:
                        outcome_known = False
                        raise RedisUnavailableError(
                            f"Redis unavailable during delete: {e}", key=key
                        ) from e
                    await backoff(attempt, cap=0.5)
                    continue
                except (rex.ConnectionError, rex.TimeoutError) as e:
                    raise_if_pool_exhausted(e, "delete", key)
                    outcome_known = False
                    raise RedisUnavailableError(
                        f"Redis unavailable during delete: {e}", key=key
                    ) from e
                await backoff(attempt)
        finally:
            if intent and outcome_known:
                await self.index.finish(owner, intent, index_cmds)
        raise ContentionError(
            f"delete of task {task_id!r} lost {self.max_attempts} transactions", key=key
        )
