"""A subscriber's backlog: the task's logged events it must replay before the live ones.

Joins to one task share one read. The first subscriber of a task to need its backlog
starts the read (the stream's first page, with the task's state and lease); every
subscriber of the task that needs it while it is on the wire waits for the same read, and
each then cuts its own part from the shared, decoded entries. So 2,000 clients joining one
task at once cost a handful of reads, not 2,000. Sharing is safe because a subscriber
reads its backlog only once its feed is live (``StreamListener.follow``), and the read is
shared only among the subscribers of that same feed, all of whose reads could have started
then: whatever is written after the read, the feed's ring (or the stream) delivers.

Joins to many tasks share round trips: every read goes through the listener's
:class:`~a2a_redis.events.reads.PipelinedReads`, which pipelines what is queued together.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, cast

from a2a.server.cluster import TaskVersion

from a2a_redis.connection.cluster import Client
from a2a_redis.events.leases import SETTLED_STATES
from a2a_redis.events.listener import StreamListener
from a2a_redis.log.codec import F_STATE, version_int
from a2a_redis.log.event_log import (
    FETCH_BATCH,
    Position,
    Rows,
    StreamEntry,
    check_not_trimmed,
    decode_rows,
    format_position,
)
from a2a_redis.log.keys import Keys

__all__ = ["REVERSE_PAGE", "Backlog", "Page"]

#: Entries of a stream's end read at a time, when looking for a version backwards.
REVERSE_PAGE = 64


@dataclass(frozen=True, slots=True)
class Page:
    """A backlog read, shared by the subscribers that joined the task meanwhile."""

    key: str  # the stream's
    entries: list[StreamEntry]  # in stream order: the whole stream, or its last page
    whole: bool  # the entries start at the stream's first entry
    running: bool  # the task's stored state is one in which its agent runs
    token: bytes | None  # the owner's lease token (it tells the lease's TTL)


class Backlog:
    """Reads subscribers' backlogs, sharing reads between joins to the same task."""

    def __init__(self, redis: Client, listener: StreamListener, keys: Keys) -> None:
        self._redis = redis
        self._listener = listener
        self._keys = keys

    async def _read(self, *commands: tuple[Any, ...]) -> list[Any]:
        replies = await self._listener.reads.read(*commands)
        for reply in replies[:1]:  # the stream's read; the others are judged by the caller
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def page(self, task_id: str, *, forward: bool) -> Page:
        """The task's stream (``forward``) or its last page, with the task's state and lease.

        Shared with every subscriber of the task that asks while it is being read.
        """
        feed = self._listener.feed_of(task_id)
        kind = "forward" if forward else "reverse"
        shared = feed.reads.get(kind)
        if shared is None:
            shared = asyncio.ensure_future(self._read_page(task_id, feed.key, forward=forward))
            feed.reads[kind] = shared

            def done(future: asyncio.Future[Any]) -> None:
                if feed.reads.get(kind) is future:
                    del feed.reads[kind]

            shared.add_done_callback(done)
        return cast(Page, await asyncio.shield(shared))

    async def _read_page(self, task_id: str, key: str, *, forward: bool) -> Page:
        """One round trip (plus one per further 512 entries of a long stream, forward)."""
        if forward:
            first: tuple[Any, ...] = ("XRANGE", key, "-", "+", "COUNT", FETCH_BATCH)
        else:
            first = ("XREVRANGE", key, "+", "-", "COUNT", REVERSE_PAGE)
        rows, state, token = await self._read(
            first, ("HGET", self._keys.task(task_id), F_STATE), ("GET", self._keys.lease(task_id))
        )
        if isinstance(state, Exception) or isinstance(token, Exception):
            state = token = None  # a corrupt record or lease: no owner to watch (reads say why)
        running = state is not None and state.isdigit() and int(state) not in SETTLED_STATES
        rows = cast(Rows, rows)
        if not forward:
            rows.reverse()
            return Page(key, decode_rows(key, rows), len(rows) < REVERSE_PAGE, running, token)
        entries = decode_rows(key, rows)
        while len(rows) == FETCH_BATCH:  # the rest of a long stream, a batch at a time
            after = "(" + rows[-1][0].decode()
            (rows,) = await self._read(("XRANGE", key, after, "+", "COUNT", FETCH_BATCH))
            entries += decode_rows(key, rows)
        return Page(key, entries, True, running, token)

    async def entries_after(
        self, after: TaskVersion, page: Page
    ) -> tuple[list[StreamEntry], Position]:
        """This subscriber's part of ``page``: its entries after ``after``, and the position before.

        It reads further back (reads of its own) if the page does not reach that far.

        Versions never decrease along a stream, so the part starts after the last entry not
        after ``after``. Raises ``SubscriberLagError`` if the entries that were asked for
        had been trimmed away.
        """
        if after.is_missing:
            return page.entries, (0, 0)
        key, entries, whole = page.key, page.entries, page.whole
        while True:
            for i in range(len(entries) - 1, -1, -1):
                version = entries[i].version  # -1: unreadable, so needed
                if version >= 0 and not TaskVersion(version).is_after(after):
                    return entries[i + 1 :], entries[i].position
            if whole or not entries:
                break
            before = "(" + format_position(entries[0].position)
            (rows,) = await self._read(("XREVRANGE", key, before, "-", "COUNT", REVERSE_PAGE))
            rows = cast(Rows, rows)
            rows.reverse()
            entries = decode_rows(key, rows) + entries
            whole = len(rows) < REVERSE_PAGE
        if entries and entries[0].version > version_int(after) + 1:
            await check_not_trimmed(self._redis, key, (0, 0))
        return entries, (0, 0)
