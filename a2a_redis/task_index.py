"""ListTasks from per-owner secondary indexes, with the SDK's semantics.

Each owner has up to four kinds of sorted set (see ``keys.py``): all tasks, by context id,
by state, and by both. Every member has score 0 and sorts by bytes in the SDK's order
(``codec.index_member``), so a page is one ``ZRANGE ... BYLEX REV LIMIT`` and the total one
``ZLEXCOUNT``: O(log N + page) for any combination of filters, ``status_timestamp_after``
included (it is the lower bound of the range).

Index upkeep happens in the same MULTI/EXEC as the task write (:meth:`TaskIndex.upkeep`).
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
from redis.asyncio import Redis

from a2a_redis.codec import (
    F_MEMBER,
    F_OWNER,
    F_SCHEMA,
    F_TASK,
    RecordHead,
    decode_locator,
    decode_task,
    encode_locator,
    member_cursor,
    member_for_cursor,
    member_task_id,
    member_timestamp_floor,
)
from a2a_redis.errors import CorruptDataError, redis_errors
from a2a_redis.keys import Keys
from a2a_redis.transaction import Command, execute

__all__ = ["TaskIndex"]

logger = logging.getLogger(__name__)

PURGE_BATCH = 256


def _now_ms() -> int:
    return int(time.time() * 1000)


class TaskIndex:
    """Maintains and queries one namespace's ListTasks indexes."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    # -- upkeep (commands for the writer's MULTI) ----------------------------------------
    def upkeep(
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
        keys = self._keys
        before: set[tuple[str, bytes]] = set()
        after: set[tuple[str, bytes]] = set()
        if old is not None:
            before = {(k, old.member) for k in keys.indexes(owner, old.context_id, old.state)}
        if new is not None:
            idx = keys.indexes(owner, new.context_id, new.status.state)
            after = {(k, new_member) for k in idx}
        cmds: list[Command] = [("ZREM", k, m) for k, m in sorted(before - after)]
        cmds += [("ZADD", k, 0, m) for k, m in sorted(after - before)]
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
                located.append((raw, ctx, state, member, member_task_id(expiring, member)))
            except CorruptDataError as e:  # drop it: one bad entry must not block the owner
                logger.warning("dropping an undecodable expiry entry: %s", e)
                await self._redis.zrem(expiring, raw)
        if not located:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for *_, task_id in located:
                pipe.exists(self._keys.task(task_id))
            alive = await execute(pipe)
            purged = 0
            for (raw, ctx, state, member, _), exists in zip(located, alive, strict=True):
                if exists:  # clock skew: the record has not expired yet; next time
                    continue
                purged += 1
                for k in self._keys.indexes(owner, ctx, state):
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
        key = self._keys.task(task_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(key, [F_OWNER, F_MEMBER])
            owner_raw, member = (await execute(pipe))[0]
            if (
                owner_raw is not None
                and member is not None
                and owner_raw.decode("utf-8", "surrogatepass") == owner
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
            for _ in range(2):
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.execute_command(
                        "ZRANGE", index, high, low, "BYLEX", "REV", "LIMIT", 0, page_size + 1
                    )
                    pipe.execute_command("ZLEXCOUNT", index, low, "+")
                    pipe.zrangebyscore(self._keys.expiring(owner), "-inf", _now_ms(), 0, 1)
                    page, total, due = await execute(pipe)
                if not due or not await self.purge_expired(owner):
                    break
            members: list[bytes] = page[:page_size]
            tasks = await self._load(owner, index, members)
        has_next = len(page) > page_size
        return ListTasksResponse(
            tasks=tasks,
            total_size=total,
            page_size=page_size,
            next_page_token=(
                encode_list_tasks_cursor(member_cursor(index, members[-1])) if has_next else None
            ),
        )

    async def _load(self, owner: str, index: str, members: list[bytes]) -> list[Task]:
        ids = [member_task_id(index, m) for m in members]
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hmget(self._keys.task(task_id), [F_SCHEMA, F_OWNER, F_TASK])
            rows = await execute(pipe)
        tasks = []
        for task_id, (schema, owner_raw, payload) in zip(ids, rows, strict=True):
            key = self._keys.task(task_id)
            if owner_raw is None or owner_raw.decode("utf-8", "surrogatepass") != owner:
                logger.warning("index %s names a task with no record; skipped", index)
                continue
            tasks.append(decode_task(key, task_id, schema, payload))
        return tasks
