"""``RedisTaskEventStream``: the SDK's cluster-mode ``TaskEventStream`` on Redis Streams.

Each task's stream (``keys.events``) is the ordered, replayable record of its events, each
with the task version it produced. ``VersionedRedisTaskStore.save`` appends saved events in
its own transaction; :meth:`RedisTaskEventStream.publish` appends only what the store did not
(Message replies; or everything, when paired with another store). Live delivery goes through
one :class:`~a2a_redis.listener.StreamListener` per process (one pub/sub connection).

``subscribe(task_id, after=v)`` yields every event whose version ``is_after(v)``, in stream
order, exactly once: it joins the live feed first, then replays the backlog from the
stream, then follows the feed, de-duplicating by entry id (and dropping a second copy of
a non-Message event at a version already delivered). It never ends by itself, except when
the task's stream is destroyed (``destroy`` or a store ``delete``): then it returns.
While Redis is unreachable, subscribers wait and resume when the listener reconnects.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import cast

from a2a.server.cluster import TaskEventStream, TaskVersion, VersionedEvent
from a2a.types.a2a_pb2 import Message

from a2a_redis.cluster import Client, keys_for
from a2a_redis.codec import ends_task_stream, version_int
from a2a_redis.durability import Durability
from a2a_redis.listener import (
    Position,
    Rows,
    StreamEntry,
    StreamListener,
    check_not_trimmed,
    decode_rows,
    read_entries,
)
from a2a_redis.streams import (
    AppendLedger,
    StreamRetention,
    append_commands,
    destroy_commands,
    parse_entry_id,
)
from a2a_redis.task_store import VersionedRedisTaskStore
from a2a_redis.transaction import run_atomically

__all__ = ["RedisTaskEventStream"]

_REVERSE_PAGE = 64


class RedisTaskEventStream(TaskEventStream):
    """Delivers task events across replicas through per-task Redis Streams.

    Args:
        redis: A ``redis.asyncio.Redis`` (``decode_responses=False``); not owned.
        prefix: Key namespace; must match the task store's.
        task_store: The ``VersionedRedisTaskStore`` the handler saves through. Given it,
            ``publish`` knows which events the store already appended and costs no round
            trip for them; the prefix and stream retention are taken from it.
        stream_retention: Cap and TTLs of the streams (when no ``task_store`` is given).
        listener: A shared :class:`StreamListener`; by default the stream makes its own
            (one pub/sub connection) and closes it in :meth:`aclose`.
        durability: Replicas that must confirm each append (``WAIT``), when no
            ``task_store`` is given (otherwise the store's).
    """

    def __init__(
        self,
        redis: Client,
        *,
        prefix: str = "a2a",
        task_store: VersionedRedisTaskStore | None = None,
        stream_retention: StreamRetention | None = None,
        listener: StreamListener | None = None,
        durability: Durability | None = None,
    ) -> None:
        if task_store is not None:
            if task_store.keys.prefix != prefix and prefix != "a2a":
                raise ValueError("prefix differs from the task store's prefix")
            self._keys = task_store.keys
            self._ledger = task_store.ledger
            self._retention = task_store.stream_retention
            self._durability = task_store.durability
        else:
            self._keys = keys_for(redis, prefix)
            self._ledger = AppendLedger()
            self._retention = stream_retention or StreamRetention()
            self._durability = durability
        self._redis = redis
        self._owns_listener = listener is None
        self._listener = listener or StreamListener(redis, self._keys)

    @property
    def listener(self) -> StreamListener:
        """The process's listener (for health checks)."""
        return self._listener

    async def aclose(self) -> None:
        """Close the listener if this stream created it; waiting subscribers then fail."""
        if self._owns_listener:
            await self._listener.aclose()

    async def publish(self, task_id: str, event: VersionedEvent) -> None:
        """Append ``event`` unless the store already did; wake every replica's subscribers.

        Round trips: 0 for an event the paired store appended; otherwise 1 (MULTI with
        XADD, PEXPIRE and PUBLISH).
        """
        version = version_int(event.version)
        if not isinstance(event.event, Message) and self._ledger.consume(task_id, version):
            return
        commands = append_commands(
            self._keys, task_id, version, event.event,
            terminal=ends_task_stream(event.event), retention=self._retention,
        )  # fmt: skip
        await run_atomically(
            self._redis, "publish", self._keys.events(task_id), commands, self._durability
        )

    async def destroy(self, task_id: str) -> None:
        """Delete the task's stream; its subscribers on every replica end cleanly."""
        await run_atomically(
            self._redis,
            "destroy",
            self._keys.events(task_id),
            destroy_commands(self._keys, task_id),
            self._durability,
        )

    async def _backlog(self, key: str, after: TaskVersion) -> tuple[list[StreamEntry], Position]:
        """Entries with a version after ``after``, and the position just before them.

        Versions never decrease along a stream, so this reads backwards from the end, a
        page at a time, until it meets an entry not after ``after`` (or, for MISSING,
        reads the whole stream forwards). Raises ``SubscriberLagError`` if the entries
        that were asked for had been trimmed away.
        """
        if after.is_missing:
            entries: list[StreamEntry] = []
            position: Position = (0, 0)
            while True:
                batch, last = await read_entries(self._redis, key, position)
                if last == position:
                    return entries, (0, 0)
                entries += batch
                position = last
        found: list[StreamEntry] = []
        high = "+"
        while True:
            rows = cast(
                Rows, await self._redis.xrevrange(key, max=high, min="-", count=_REVERSE_PAGE)
            )
            for row in rows:
                decoded = decode_rows(key, [row])
                if decoded and not TaskVersion(decoded[0].version).is_after(after):
                    found.reverse()
                    return found, parse_entry_id(row[0])
                found += decoded
            if len(rows) < _REVERSE_PAGE:
                break
            high = "(" + rows[-1][0].decode()
        found.reverse()
        if found and found[0].version > version_int(after) + 1:
            await check_not_trimmed(self._redis, key, (0, 0))
        return found, (0, 0)

    async def subscribe(
        self, task_id: str, *, after: TaskVersion
    ) -> AsyncGenerator[VersionedEvent, None]:
        """Yield the task's events newer than ``after``: the backlog, then live ones.

        Round trips: 2-3 to join (SUBSCRIBE and the stream's end, for the first local
        subscriber of the task), 1+ for the backlog; then none per event (the feed reads).
        """
        key = self._keys.events(task_id)
        delivered = 0  # highest version of a non-Message event yielded (de-duplication)
        entries = self._listener.follow(task_id, lambda: self._backlog(key, after))
        try:
            async for entry in entries:
                event, version = entry.event, entry.version
                del entry  # an idle subscriber must not pin the last event (nor below)
                if event is None or not TaskVersion(version).is_after(after):
                    continue
                if version and not isinstance(event, Message):
                    if version <= delivered:
                        continue  # a second copy of an event already delivered
                    delivered = version
                yield VersionedEvent(event=event, version=TaskVersion(version))
                del event
        finally:
            await entries.aclose()
