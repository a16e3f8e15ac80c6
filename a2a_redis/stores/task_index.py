"""ListTasks from per-owner secondary indexes, with the SDK's semantics.

Each owner has up to four kinds of sorted set (see ``keys.py``): all tasks, by context id,
by state, and by both. Every member has score 0 and sorts by bytes in the SDK's order
(``codec.index_member``), so a page is one ``ZRANGE ... BYLEX REV LIMIT`` and the total one
``ZLEXCOUNT``: O(log N + page) for any combination of filters, ``status_timestamp_after``
included (it is the lower bound of the range).

A member that names a task with no record (or another owner's) is skipped with a WARNING,
as a race with a delete can leave one for a moment. A member that cannot be decoded at all,
like a record that cannot, fails the call with ``CorruptDataError`` naming the index key:
a listing never hides a task silently, and the operator can remove the member (ZREM).

Index changes go into the same MULTI/EXEC as the task write (:meth:`TaskIndex.index_commands`).

On Redis Cluster an owner's index keys (tag ``{o:OWNER}``) and a task's keys (tag
``{t:ID}``) live in different slots, so no transaction can span both. There the indexes are
kept correct across slots instead:

* a write first intents itself in the owner's ``pending`` zset, then commits the task (its
  own slot), then applies the index change and clears its intent in one script (the owner's
  slot). So every committed state is indexed, unless the writer died in between;
* a reader checks every entry of a page against the task hash (owner and index member)
  and removes entries that no longer match: a list never returns another owner's task or
  a stale state;
* a reader also reconciles intents older than :data:`PENDING_GRACE_MS` (a writer that died
  between commit and index update): it indexes the task as its hash now stands.

``total_size`` can count an entry whose removal is pending (for the milliseconds between a
commit and its index update, or until a list pages over a writer's leftovers).

Terminal tasks with a TTL are also entered in the owner's ``expiring`` zset, from which
expired tasks' index entries are purged: when that owner lists, and after each terminal
write, a bounded batch at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import cast

from a2a.types.a2a_pb2 import ListTasksRequest, ListTasksResponse, Task
from a2a.utils.constants import DEFAULT_LIST_TASKS_PAGE_SIZE
from a2a.utils.errors import InvalidParamsError
from a2a.utils.task import decode_list_tasks_cursor, decode_page_token, encode_list_tasks_cursor

from a2a_redis.connection.cluster import Client
from a2a_redis.connection.transaction import Command, bulk, execute, run_atomically
from a2a_redis.errors import A2ARedisError, CorruptDataError, InvalidIdError, redis_errors
from a2a_redis.log.codec import (
    F_CONTEXT,
    F_MEMBER,
    F_OWNER,
    F_SCHEMA,
    F_STATE,
    F_TASK,
    RecordHead,
    decode_locator,
    decode_task,
    decode_text,
    encode_locator,
    member_cursor,
    member_for_cursor,
    member_task_id,
    member_timestamp_floor,
    utf8,
)
from a2a_redis.log.keys import Keys

__all__ = ["TaskIndex"]

logger = logging.getLogger(__name__)

PURGE_BATCH = 256
#: Redis Cluster: a write's pending index intent older than this is reconciled by a reader.
PENDING_GRACE_MS = 5_000
RECONCILE_BATCH = 64
QUERY_ROUNDS = 4  # a list re-reads after purging, reconciling or repairing, this often
_CACHED = 4096  # (owner, context id, state) combinations whose index keys are kept packed
#: An index key, as bytes and as a packed argument.
Packed = tuple[tuple[bytes, bytes], ...]


def _now_ms() -> int:
    return int(time.time() * 1000)


class TaskIndex:
    """Maintains and queries one namespace's ListTasks indexes."""

    def __init__(self, redis: Client, keys: Keys, *, split: bool = False) -> None:
        self._redis = redis
        self._keys = keys
        #: True on Redis Cluster: index keys are not in the task's slot (see module doc).
        self.split = split
        self._packed: dict[tuple[str, str, int], Packed] = {}

    def packed_keys(self, owner: str, context_id: str, state: int) -> Packed:
        """Every index of a task with this context id and state: (key, packed key), cached.

        Raises ``InvalidIdError`` for an over-long owner or context id, as ``Keys`` does.
        """
        found = self._packed.get((owner, context_id, state))
        if found is None:
            if len(self._packed) >= _CACHED:
                self._packed.clear()
            keys = [k.encode() for k in self._keys.indexes(owner, context_id, state)]
            found = self._packed[owner, context_id, state] = tuple((k, bulk(k)) for k in keys)
        return found

    def moves(
        self, owner: str, old: RecordHead | None, new: Task | None, new_member: bytes
    ) -> tuple[Packed, Packed]:
        """The index entries a write leaves (member ``old.member``) and enters (``new_member``)."""
        before = () if old is None else self.packed_keys(owner, old.context_id, old.state)
        if new is None:
            return before, ()
        after = self.packed_keys(owner, new.context_id, new.status.state)
        if old is not None and old.member == new_member:  # the entries that stay are not touched
            return tuple(k for k in before if k not in after), tuple(
                k for k in after if k not in before
            )
        return before, after

    # -- index changes (commands for the writer's MULTI) ----------------------------------------
    def index_commands(
        self,
        owner: str,
        old: RecordHead | None,
        new: Task | None,
        new_member: bytes = b"",
        new_expires_at: int = 0,
    ) -> list[Command]:
        """Commands moving a task's index entries from record ``old`` to task ``new``.

        ``new`` None means the task is deleted. Entries that do not change are not touched.
        """
        gone, added = self.moves(owner, old, new, new_member)
        cmds: list[Command] = [("ZREM", k, old.member) for k, _ in gone] if old is not None else []
        cmds += [("ZADD", k, 0, new_member) for k, _ in added]
        return cmds + self.expiry_commands(owner, old, new, new_member, new_expires_at)

    def expiry_commands(
        self,
        owner: str,
        old: RecordHead | None,
        new: Task | None,
        new_member: bytes,
        new_expires_at: int,
    ) -> list[Command]:
        """The changes to the owner's ``expiring`` zset (terminal tasks with a TTL)."""
        keys = self._keys
        cmds: list[Command] = []
        old_loc = old.locator() if old is not None and old.expires_at else None
        new_loc = (
            encode_locator(new.context_id, new.status.state, new_member)
            if new is not None and new_expires_at
            else None
        )
        if old_loc is not None and old_loc != new_loc:
            cmds.append(("ZREM", keys.expiring(owner), old_loc))
        if new_loc is not None:
            cmds.append(("ZADD", keys.expiring(owner), new_expires_at, new_loc))
        return cmds

    # -- cross-slot index changes (Redis Cluster) -----------------------------------------------
    @staticmethod
    def intent(task_id: str, write_id: bytes) -> bytes:
        """The pending intent of one write: its write id, then the task id."""
        return write_id + utf8(task_id)

    async def begin(self, owner: str, intent: bytes) -> None:
        """Mark a write as pending in the owner's slot, before it commits (one round trip)."""
        key = self._keys.pending(owner)
        with redis_errors("intent index update", key):
            await self._redis.zadd(key, {intent: _now_ms()})

    async def finish(self, owner: str, intent: bytes, commands: list[Command]) -> None:
        """Apply a committed write's index change and clear its intent (one script).

        Best effort: the write has committed whatever happens here; if this fails, the
        intent stays and a later list reconciles the task.
        """
        key = self._keys.pending(owner)
        try:
            await run_atomically(
                self._redis, "update task index", key, [*commands, ("ZREM", key, intent)]
            )
        except A2ARedisError as e:
            logger.warning("index update failed (a later list repairs it): %s", e)

    async def _reconcile(self, owner: str) -> int:
        """Index the tasks of pending intents older than the grace (their writer died)."""
        pending = self._keys.pending(owner)
        due = cast(
            "list[bytes]",
            await self._redis.zrangebyscore(
                pending, "-inf", _now_ms() - PENDING_GRACE_MS, 0, RECONCILE_BATCH
            ),
        )
        if not due:
            return 0
        keys = sorted({k for k in map(self._intent_key, due) if k is not None})
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, [F_OWNER, F_CONTEXT, F_STATE, F_MEMBER])
            rows = await execute(pipe)
        commands: list[Command] = []
        mine = utf8(owner)
        for owner_raw, context, state, member in rows:
            if owner_raw != mine or member is None:
                continue  # deleted, or another owner's: nothing of ours to index
            state_n = int(state) if state and state.isdigit() and len(state) < 10 else 0
            try:
                context_id = decode_text(pending, "c", context or b"")
                indexes = self._keys.indexes(owner, context_id, state_n)
            except (CorruptDataError, InvalidIdError):
                continue  # a corrupt record: reading it says so
            for key in indexes:
                commands.append(("ZADD", key, 0, member))
        commands.append(("ZREM", pending, *due))
        await run_atomically(self._redis, "reconcile task index", pending, commands)
        logger.warning("reconciled %d tasks whose index update was interrupted", len(keys))
        return len(due)

    def _intent_key(self, intent: bytes) -> str | None:
        """The task key a pending intent names (None for an intent that cannot name one)."""
        try:
            return self._keys.task(decode_text("", "pending intent", intent[8:]))
        except (CorruptDataError, InvalidIdError):
            return None

    # -- purge ---------------------------------------------------------------------------
    async def purge_expired(self, owner: str) -> int:
        """Remove the index entries of the owner's expired tasks (one bounded batch).

        Two round trips when something is due (read due entries, then check and remove),
        one otherwise. Returns how many tasks were purged.
        """
        expiring = self._keys.expiring(owner)
        with redis_errors("purge expired tasks", expiring):
            due = await self._redis.zrangebyscore(expiring, "-inf", _now_ms(), 0, PURGE_BATCH)
            return await self._purge(owner, cast("list[bytes]", due))

    async def _purge(self, owner: str, due: Iterable[bytes]) -> int:
        expiring = self._keys.expiring(owner)
        located = []
        for raw in due:
            try:
                ctx, state, member = decode_locator(expiring, raw)
                task_key = self._keys.task(member_task_id(expiring, member))
                indexes = self._keys.indexes(owner, ctx, state)
                located.append((raw, member, task_key, indexes))
            except (CorruptDataError, InvalidIdError) as e:  # drop it: it must not block the owner
                logger.warning("dropping an undecodable expiry entry: %s", e)
                await self._redis.zrem(expiring, raw)
        if not located:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, _, task_key, _ in located:
                pipe.exists(task_key)
            alive = await execute(pipe)
            purged = 0
            for (raw, member, _, indexes), exists in zip(located, alive, strict=True):
                if exists:  # clock skew: the record has not expired yet; next time
                    continue
                purged += 1
                for k in indexes:
                    pipe.zrem(k, member)
                pipe.zrem(expiring, raw)
            if purged:
                await execute(pipe)
        logger.debug("purged %d expired tasks from the indexes of one owner", purged)
        return purged

    # -- query ---------------------------------------------------------------------------
    async def _legacy_bound(self, owner: str, index: str, low: bytes, token: str) -> bytes:
        """The inclusive upper bound named by a legacy (first-task-id) page token."""
        task_id = decode_page_token(token)
        try:
            key = self._keys.task(task_id)
        except InvalidIdError:  # an id no task can have
            raise InvalidParamsError(f"Invalid page token: {token[:64]}") from None
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(key, [F_OWNER, F_MEMBER])
            owner_raw, member = (await execute(pipe))[0]
            if (
                owner_raw is not None
                and member is not None
                and owner_raw == utf8(owner)
                and (low == b"-" or member >= low[1:])
            ):
                pipe.zscore(index, member)
                if (await execute(pipe))[0] is not None:
                    return b"[" + bytes(member)
        raise InvalidParamsError(f"Invalid page token: {token}")

    async def query(self, owner: str, params: ListTasksRequest) -> ListTasksResponse:
        """Answer ListTasks for ``owner``.

        Round trips: 2 (page + total + due-check pipelined; then the page's records
        pipelined); +1 for a legacy page token; +2 when expired entries must be purged first.
        """
        index = self._keys.index(owner, params.context_id, params.status)
        low = b"-"
        if params.HasField("status_timestamp_after"):
            low = b"[" + member_timestamp_floor(params.status_timestamp_after.ToNanoseconds())
        page_size = params.page_size or DEFAULT_LIST_TASKS_PAGE_SIZE
        with redis_errors("list tasks", index):
            high = b"+"
            if params.page_token:
                cursor = decode_list_tasks_cursor(params.page_token)
                if cursor is None:
                    high = await self._legacy_bound(owner, index, low, params.page_token)
                else:
                    high = b"(" + member_for_cursor(cursor)
            for _ in range(QUERY_ROUNDS):
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.execute_command(
                        "ZRANGE", index, high, low, "BYLEX", "REV", "LIMIT", 0, page_size + 1
                    )
                    pipe.execute_command("ZLEXCOUNT", index, low, "+")
                    pipe.zrangebyscore(self._keys.expiring(owner), "-inf", _now_ms(), 0, 1)
                    if self.split:
                        pipe.zrangebyscore(
                            self._keys.pending(owner), "-inf", _now_ms() - PENDING_GRACE_MS, 0, 1
                        )
                    page, total, due, *pending = await execute(pipe)
                if due and await self.purge_expired(owner):
                    continue
                if pending and pending[0] and await self._reconcile(owner):
                    continue
                members: list[bytes] = page[:page_size]
                tasks, stale = await self._load(owner, index, members, params)
                if not stale:
                    break
                await self._redis.zrem(index, *stale)  # repair, then read the page again
        has_next = len(page) > page_size
        return ListTasksResponse(
            tasks=tasks,
            total_size=total,
            page_size=page_size,
            next_page_token=(
                encode_list_tasks_cursor(member_cursor(index, members[-1])) if has_next else None
            ),
        )

    async def _load(
        self, owner: str, index: str, members: list[bytes], params: ListTasksRequest
    ) -> tuple[list[Task], list[bytes]]:
        """The page's tasks, and (on a cluster) the entries that no longer match a record."""
        named: list[tuple[str, str]] = []  # (task id, key)
        for entry in members:
            task_id = member_task_id(index, entry)  # CorruptDataError naming the index
            try:
                named.append((task_id, self._keys.task(task_id)))
            except InvalidIdError:  # no task can have such an id: the member is corrupt
                raise CorruptDataError("index member names an over-long id", key=index) from None
        if not named:
            return [], []
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, key in named:
                pipe.hmget(key, [F_SCHEMA, F_OWNER, F_TASK, F_MEMBER])
            rows = await execute(pipe)
        tasks: list[Task] = []
        stale: list[bytes] = []
        mine = utf8(owner)
        for (task_id, key), entry, (schema, owner_raw, payload, member) in zip(
            named, members, rows, strict=True
        ):
            if owner_raw is None or owner_raw != mine:
                if self.split:
                    stale.append(entry)
                else:
                    logger.warning("index %s names a task with no record; skipped", index)
                continue
            if self.split and member != entry:
                stale.append(entry)  # the task has moved on (or this write never committed)
                continue
            task = decode_task(key, task_id, schema, payload)
            if self.split and (
                (params.status and task.status.state != params.status)
                or (params.context_id and task.context_id != params.context_id)
            ):
                stale.append(entry)  # same position, but no longer in this state or context
                continue
            tasks.append(task)
        return tasks, stale
