"""Task stores on Redis: ``VersionedRedisTaskStore`` (cluster mode) and ``RedisTaskStore``.

Both are views of one record engine (``records.py``) under one prefix, so they see the same
tasks. Task ids are unique per prefix, as the SDK's runtime assumes (its active-task
registry and its ``TaskEventStream`` are keyed by task id alone). The record names its
owner: another owner's ``get`` sees None, its ``list`` does not see the task, its
``delete`` is a no-op, and its writes are refused (a version conflict for the versioned
store, ``TaskOwnedElsewhereError`` for the plain one) instead of overwriting the task.

In both, a terminal state (COMPLETED, CANCELED, FAILED, REJECTED) is final: a save that
would change it raises ``TerminalStateError`` (a ``ConcurrentTaskModificationError`` too)
and writes nothing; a save in the same terminal state is allowed. The SDK's in-memory and
SQL stores do not enforce this.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import TypeVar

from a2a.server.cluster import (
    ConcurrentTaskModificationError,
    StoredTask,
    TaskVersion,
    VersionedTaskStore,
)
from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event
from a2a.server.owner_resolver import OwnerResolver, resolve_user_scope
from a2a.server.tasks.task_store import TaskStore
from a2a.types.a2a_pb2 import ListTasksRequest, ListTasksResponse, Task, TaskState

from a2a_redis import telemetry
from a2a_redis.connection.cluster import Client
from a2a_redis.connection.durability import Durability
from a2a_redis.errors import TaskOwnedElsewhereError
from a2a_redis.log.codec import MAX_PAYLOAD_BYTES, TERMINAL_STATES, RecordHead
from a2a_redis.log.event_log import AppendLedger, StreamRetention
from a2a_redis.log.keys import Keys
from a2a_redis.options import DEFAULT_MAX_ATTEMPTS, Options
from a2a_redis.stores.records import TaskRecords

__all__ = ["RedisTaskStore", "VersionedRedisTaskStore"]

_Store = TypeVar("_Store", bound="_OverRecords")
_CANCELED = TaskState.TASK_STATE_CANCELED  # (a protobuf enum's attribute takes a microsecond)
_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("a2a_redis_strict", default=False)


class _OverRecords:
    """The construction both stores share: keyword options, or ``from_options``."""

    _records: TaskRecords

    def __init__(
        self,
        redis: Client,
        *,
        prefix: str = "a2a",
        owner_resolver: OwnerResolver = resolve_user_scope,
        terminal_ttl: float | None = None,
        stream_retention: StreamRetention | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        durability: Durability | None = None,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        options = Options(
            prefix=prefix,
            owner_resolver=owner_resolver,
            terminal_ttl=terminal_ttl,
            stream_retention=stream_retention or StreamRetention(),
            max_attempts=max_attempts,
            durability=durability,
            max_payload_bytes=max_payload_bytes,
        )
        self._records = TaskRecords(redis, options)

    @classmethod
    def from_options(cls: type[_Store], redis: Client, options: Options) -> _Store:
        """A store over ``redis`` with the backend's shared ``options``."""
        return cls._sharing(TaskRecords(redis, options))

    @classmethod
    def _sharing(cls: type[_Store], records: TaskRecords) -> _Store:
        store = cls.__new__(cls)
        store._records = records
        return store

    @property
    def options(self) -> Options:
        """The options this store was made with."""
        return self._records.options

    @property
    def redis(self) -> Client:
        """The client this store uses (not owned)."""
        return self._records.redis

    @property
    def keys(self) -> Keys:
        """The key builder of this store's namespace."""
        return self._records.keys

    @property
    def records(self) -> TaskRecords:
        """The record engine under this store (unscoped: for the replicas' bookkeeping)."""
        return self._records


class VersionedRedisTaskStore(_OverRecords, VersionedTaskStore):
    """The SDK's cluster-mode ``VersionedTaskStore`` on Redis.

    Versions are integers counting writes (1 on the first write, +1 on each write), as in
    the SDK's ``VersionedDatabaseTaskStore``. ``save(..., event=...)`` appends the event
    to the task's stream, with the new version, in the same MULTI/EXEC as the record.

    Args:
        redis: A ``redis.asyncio.Redis`` with ``decode_responses=False``. The store does not
            own it and never closes it.
        prefix: Key namespace (default ``"a2a"``).
        owner_resolver: Maps a call context to its owner (default: the user name).
        terminal_ttl: Seconds to keep a task after a write in a terminal state; None (the
            default) keeps tasks forever, as a database would.
        stream_retention: Cap and TTLs of each task's event stream.
        max_attempts: Optimistic-transaction attempts per write before giving up (default 8).
        durability: Replicas that must confirm each write (``WAIT``); None waits for none.
        max_payload_bytes: Largest encoded Task, and event, a save accepts (default 8 MiB);
            a larger one raises ``PayloadTooLargeError`` and writes nothing.
    """

    @staticmethod
    @contextlib.contextmanager
    def strict_cancel() -> Iterator[None]:
        """Within this block (this task's context), a CANCELED write is version-checked.

        The SDK's contract lets CANCELED skip the check, so that a cancel wins over the
        agent's writes; a handler that re-reads and retries uses this instead, so that the
        CANCELED task keeps every artifact stored before it.
        """
        token = _STRICT.set(True)
        try:
            yield
        finally:
            _STRICT.reset(token)

    @functools.cached_property
    def as_task_store(self) -> RedisTaskStore:
        """The unversioned ``TaskStore`` view over the same records."""
        return RedisTaskStore._sharing(self._records)

    @property
    def ledger(self) -> AppendLedger:
        """The in-process record of events this store appended (shared with the stream)."""
        return self._records.ledger

    @telemetry.store_operation("save")
    async def save(
        self,
        task: Task,
        *,
        event: Event | None = None,
        prev: Task | None = None,
        prev_version: TaskVersion,
        context: ServerCallContext,
    ) -> TaskVersion:
        """Compare-and-swap ``task`` against ``prev_version``; return the new version.

        ``prev_version`` MISSING is a first write and conflicts with any stored task. A write
        moving the task to CANCELED skips the version check if the stored task is
        non-terminal, and conflicts if it is terminal or absent. Conflicts raise the SDK's
        ``ConcurrentTaskModificationError`` and are never retried here. A write that would
        change a stored terminal state raises its subclass ``TerminalStateError``, whatever
        ``prev_version`` (re-reading cannot help); one keeping that state (say, COMPLETED
        saved again with a last artifact) is checked as any other write.
        """
        del prev
        # (A strict cancel is checked against prev_version like any write.)
        cancel = task.status.state == _CANCELED and not _STRICT.get()

        def decide(old: RecordHead | None) -> int:
            if cancel:
                if old is None or old.state in TERMINAL_STATES:
                    raise ConcurrentTaskModificationError(task.id)
                return old.version + 1
            if old is None:
                if prev_version.is_missing:
                    return 1
                raise ConcurrentTaskModificationError(task.id)
            if TaskVersion(old.version) != prev_version:
                raise ConcurrentTaskModificationError(task.id)
            return old.version + 1

        owner = self._records.owner_resolver(context)
        try:
            version = await self._records.write(task, owner, event, decide)
        except TaskOwnedElsewhereError as e:
            raise ConcurrentTaskModificationError(task.id) from e
        return TaskVersion(version)

    @telemetry.store_operation("get")
    async def get(self, task_id: str, context: ServerCallContext) -> StoredTask | None:
        """The owner's task with its version, or None. One round trip."""
        found = await self._records.read(task_id, self._records.owner_resolver(context))
        return None if found is None else StoredTask(found[0], TaskVersion(found[1]))

    @telemetry.store_operation("list")
    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        """ListTasks over the owner's indexes (see ``task_index.TaskIndex.list``)."""
        owner = self._records.owner_resolver(context)
        return await self._records.index.query(owner, params)

    @telemetry.store_operation("delete")
    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        """Delete the owner's task with its stream and index entries; no-op if not theirs."""
        await self._records.remove(task_id, self._records.owner_resolver(context))


class RedisTaskStore(_OverRecords, TaskStore):
    """The SDK's plain ``TaskStore`` on Redis, over the same records as the versioned store.

    ``save`` is an upsert (each write still advances the version, so a versioned view of
    the same task stays consistent). It raises ``TaskOwnedElsewhereError`` if another
    owner holds the task id, and ``TerminalStateError`` if the stored task is in a terminal
    state and the write would change it (the same terminal state may be written again).

    Args are those of :class:`VersionedRedisTaskStore`.
    """

    @telemetry.store_operation("save")
    async def save(self, task: Task, context: ServerCallContext) -> None:
        """Insert or overwrite the owner's task, unless that would end a terminal state."""
        owner = self._records.owner_resolver(context)
        await self._records.write(
            task, owner, None, lambda old: 1 if old is None else old.version + 1
        )

    @telemetry.store_operation("get")
    async def get(self, task_id: str, context: ServerCallContext) -> Task | None:
        """The owner's task, or None. One round trip."""
        found = await self._records.read(task_id, self._records.owner_resolver(context))
        return None if found is None else found[0]

    @telemetry.store_operation("list")
    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        """ListTasks over the owner's indexes."""
        return await self._records.index.query(self._records.owner_resolver(context), params)

    @telemetry.store_operation("delete")
    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        """Delete the owner's task; no-op if it is absent or another owner's."""
        await self._records.remove(task_id, self._records.owner_resolver(context))
