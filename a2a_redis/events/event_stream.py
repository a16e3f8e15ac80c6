"""``RedisTaskEventStream``: the SDK's cluster-mode ``TaskEventStream`` on Redis Streams.

Each task's stream (``keys.events``) is the ordered, replayable record of its events, each
with the task version it produced. ``VersionedRedisTaskStore.save`` appends saved events in
its own transaction; :meth:`RedisTaskEventStream.publish` appends only what the store did not
(Message replies; or everything, when paired with another store). Live delivery goes through
one :class:`~a2a_redis.events.listener.StreamListener` per process (one pub/sub connection).

``subscribe(task_id, after=v)`` yields every event whose version ``is_after(v)``, in stream
order, exactly once: it joins the live feed first, then replays the backlog from the
stream, then follows the feed, de-duplicating by entry id (and dropping a second copy of
a non-Message event at a version already delivered). It never ends by itself, except when
the task's stream is destroyed (``destroy`` or a store ``delete``): then it returns.
While Redis is unreachable, subscribers wait and resume when the listener reconnects.

Replica death: the replica that publishes a running task's events holds the task's lease
(``events/leases.py``): one loop per process renews all its leases and sends each task's
subscribers a heartbeat every ``lease_ttl / 3``. A subscriber of a task in a running state
(submitted or working) that hears neither an event nor a heartbeat for the owner's
``lease_ttl`` raises :class:`~a2a_redis.events.listener.OwnerLostError`: the replica running the
task is gone, and nobody will finish it unless a follow-up message or a cancel is sent.
A task waiting for input (or authentication) has no owner, and its subscribers wait.

An entry that cannot be decoded is never skipped silently: a subscriber that needs it
(its version, when readable, is after ``after``) ends with the typed error,
``CorruptDataError`` or ``UnsupportedSchemaError``, naming the stream's key and the entry
id. The other subscribers of the task, and of every other task, carry on.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator
from dataclasses import replace

from a2a.server.cluster import TaskEventStream, TaskVersion, VersionedEvent
from a2a.server.events.event_queue import Event
from a2a.types.a2a_pb2 import Message, Task, TaskArtifactUpdateEvent
from redis import exceptions as rex

from a2a_redis import telemetry
from a2a_redis.connection.cluster import Client
from a2a_redis.connection.durability import Durability, run_script
from a2a_redis.connection.transaction import FALLBACK, batch_args, call_packed, pack
from a2a_redis.errors import redis_errors
from a2a_redis.events.backlog import Backlog
from a2a_redis.events.leases import SETTLED_STATES, LeaseKeeper
from a2a_redis.events.listener import StreamListener
from a2a_redis.events.plumbing import EventPlumbing, OnEventPlumbing
from a2a_redis.events.tokens import lease_ttl_of
from a2a_redis.log.codec import MAX_PAYLOAD_BYTES, version_int
from a2a_redis.log.event_log import (
    APPEND_IF_NEW_SCRIPT,
    AppendLedger,
    Position,
    StreamEntry,
    StreamRetention,
    destroy_commands,
    share_view,
)
from a2a_redis.options import DEFAULT_LEASE_TTL, Options
from a2a_redis.stores.task_store import VersionedRedisTaskStore

__all__ = ["RedisTaskEventStream"]


class Activity(enum.Enum):
    """What an event says of its task's agent."""

    RUNNING = "running"  #: an artifact update, or a state in which the agent runs
    SETTLED = "settled"  #: terminal, input- or auth-required, or a Message reply
    SILENT = "silent"  #: nothing (an event without a status)


def activity_of(event: Event) -> Activity:
    """Whether ``event`` says its task's agent is running, has settled, or neither."""
    if isinstance(event, Message):
        return Activity.SETTLED
    if isinstance(event, TaskArtifactUpdateEvent):
        return Activity.RUNNING
    status = getattr(event, "status", None)
    if status is None:
        return Activity.SILENT
    return Activity.SETTLED if status.state in SETTLED_STATES else Activity.RUNNING


def _check_needed(entry: StreamEntry, floor: int, delivered: int) -> None:
    """Raise (a copy of) an undecodable entry's error if this subscriber may need it.

    It may unless its version (-1: unknown) is not after ``floor``, or was delivered.
    """
    error, version = entry.error, entry.version
    if error is None:
        return
    if version < 0 or (_is_after(version, floor) and not 0 < version <= delivered):
        raise type(error)(error.reason, key=error.key)  # a copy per subscriber


def _is_after(version: int, floor: int) -> bool:
    """``TaskVersion(version).is_after(TaskVersion(floor))``, without making either."""
    return floor == 0 or floor < version != 0


#: What the subscribers of one entry share (``StreamEntry.view``): the event as they yield
#: it, its activity, and whether it is logged at its version (so de-duplicated by it).
View = tuple[VersionedEvent, Activity, bool]


def _view(entry: StreamEntry) -> View | None:
    """The entry's shared view, made by its first reader; None for an entry without event."""
    view: View | None = entry.view
    if view is None and entry.event is not None:
        event, version = entry.event, entry.version
        logged = bool(version) and not isinstance(event, Message)
        view = (
            VersionedEvent(event=event, version=TaskVersion(version)),
            activity_of(event),
            logged,
        )
        share_view(entry, view)
    return view


class _OwnerWatch:
    """Whether a subscriber expects its task's owner alive, and for how long it waits."""

    __slots__ = ("options", "running", "ttl")

    def __init__(self, ttl: float, options: Options) -> None:
        self.running = False
        self.ttl = ttl
        self.options = options

    def timeout(self) -> float | None:
        return self.options.owner_silence(self.ttl) if self.running else None


class RedisTaskEventStream(OnEventPlumbing, TaskEventStream):
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
        leases: A shared :class:`LeaseKeeper` (``RedisBackend`` shares one per process);
            by default the stream makes its own, with ``lease_ttl``.
        lease_ttl: Seconds the lease of a task this replica runs lasts without renewal
            (default 10): a remote subscriber of a running task whose replica died raises
            ``OwnerLostError`` after about this long.
        durability: Replicas that must confirm each append (``WAIT``), when no
            ``task_store`` is given (otherwise the store's).
        max_payload_bytes: Largest encoded event ``publish`` appends (default: the task
            store's, else 8 MiB); a larger one raises ``PayloadTooLargeError``.
    """

    def __init__(
        self,
        redis: Client,
        *,
        prefix: str = "a2a",
        task_store: VersionedRedisTaskStore | None = None,
        stream_retention: StreamRetention | None = None,
        listener: StreamListener | None = None,
        leases: LeaseKeeper | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        durability: Durability | None = None,
        max_payload_bytes: int | None = None,
    ) -> None:
        if task_store is not None:
            if task_store.keys.prefix != prefix and prefix != "a2a":
                raise ValueError("prefix differs from the task store's prefix")
            options = replace(
                task_store.options,
                lease_ttl=lease_ttl,
                max_payload_bytes=max_payload_bytes or task_store.options.max_payload_bytes,
            )
        else:
            options = Options(
                prefix=prefix,
                stream_retention=stream_retention or StreamRetention(),
                lease_ttl=lease_ttl,
                durability=durability,
                max_payload_bytes=max_payload_bytes or MAX_PAYLOAD_BYTES,
            )
        ledger = task_store.ledger if task_store is not None else None
        self._setup(redis, options, ledger, listener, leases)

    @classmethod
    def from_options(
        cls,
        redis: Client,
        options: Options,
        *,
        ledger: AppendLedger | None = None,
        listener: StreamListener | None = None,
        leases: LeaseKeeper | None = None,
    ) -> RedisTaskEventStream:
        """An event stream over ``redis`` with the backend's shared ``options``.

        ``ledger`` is the paired task store's (``VersionedRedisTaskStore.ledger``), so that
        ``publish`` skips what the store appended already.
        """
        stream = cls.__new__(cls)
        stream._setup(redis, options, ledger, listener, leases)
        return stream

    def _setup(
        self,
        redis: Client,
        options: Options,
        ledger: AppendLedger | None,
        listener: StreamListener | None,
        leases: LeaseKeeper | None,
    ) -> None:
        self._log = EventPlumbing(redis, options, listener=listener, leases=leases)
        self._ledger = AppendLedger() if ledger is None else ledger
        self._append_if_new = redis.register_script(APPEND_IF_NEW_SCRIPT)
        self._backlogs = Backlog(redis, self._log.listener, self._log.keys)

    async def aclose(self) -> None:
        """Close the listener and leases this stream created; waiting subscribers then fail."""
        await self._log.aclose()

    async def publish(self, task_id: str, event: VersionedEvent) -> None:
        """Append ``event`` unless the store already did; wake every replica's subscribers.

        Round trips: 0 for an event the paired store appended; otherwise 1 (one script:
        XADD, PEXPIRE and PUBLISH). An event other than a Message is not appended if the
        stream already holds its version or a later one: the SDK republishes a task it
        reloaded after losing a race, and that state is logged already. The publisher of a
        running task holds its lease, and lets it go at an event that settles the task: +1
        round trip at a task's first event (the Task: its lease and this replica's
        registration, for the orphan reaper, written before the event goes out); a task that
        runs again (after input) is held without one (written at the end of this turn).
        """
        activity = activity_of(event.event)
        if activity is Activity.RUNNING:
            if isinstance(event.event, Task):  # the task's first event: register it now
                await self.leases.hold_now(task_id)
            else:  # written with this turn's other new holdings, off the event's path
                self.leases.hold(task_id)
        elif activity is Activity.SETTLED:
            self.leases.drop(task_id)
        version = version_int(event.version)
        if not isinstance(event.event, Message) and self._ledger.consume(task_id, version):
            return
        with telemetry.span("publish"):  # (the entry carries this span's context)
            commands = self._log.append_commands(task_id, version, event.event)
            if not version or isinstance(event.event, Message):
                await self._log.run("publish", task_id, commands)
                return
            key = self._log.keys.events(task_id)
            keys, argv = batch_args(commands)  # the stream comes first: XADD is the first
            durability = self._log.options.durability
            with redis_errors("publish", key):
                if durability is None or not durability.waits:
                    # Below redis-py's command machinery (no task per write, one timeout).
                    sha = self._append_if_new.sha
                    packed = pack([("EVALSHA", sha, len(keys), *keys, version, *argv)])
                    reply = await call_packed(self.redis, packed)
                    if isinstance(reply, rex.NoScriptError):
                        reply = FALLBACK  # redis-py's Script loads it and runs it again
                    elif isinstance(reply, Exception):
                        raise reply
                    if reply is not FALLBACK:
                        return
                await run_script(
                    self.redis, self._append_if_new, keys, [version, *argv], durability, key
                )

    async def destroy(self, task_id: str) -> None:
        """Delete the task's stream; its subscribers on every replica end cleanly."""
        self.leases.drop(task_id)
        await self._log.run("destroy", task_id, destroy_commands(self._log.keys, task_id))

    async def _backlog(
        self, task_id: str, after: TaskVersion, watch: _OwnerWatch
    ) -> tuple[list[StreamEntry], Position]:
        """Entries with a version after ``after``, and the position just before them.

        Read with the task's state and lease, which tell whether the task is running now
        (so its owner must be alive) and how long the owner's lease lasts; the read is
        shared with the task's other joining subscribers (``events/backlog.py``).
        """
        page = await self._backlogs.page(task_id, forward=after.is_missing)
        watch.running = page.running
        watch.ttl = lease_ttl_of(page.token, self.leases.ttl)
        return await self._backlogs.entries_after(after, page)

    async def subscribe(
        self, task_id: str, *, after: TaskVersion
    ) -> AsyncGenerator[VersionedEvent, None]:
        """Yield the task's events newer than ``after``: the backlog, then live ones.

        Round trips: 2-3 to join (SUBSCRIBE and the stream's end, for the first local
        subscriber of the task), 1+ for the backlog (its first page read together with the
        task's state and lease); then none per event (the feed reads).

        Raises :class:`~a2a_redis.events.listener.OwnerLostError` if the task is running (its
        stored state, then the events' states, say so) and neither an event nor a heartbeat
        comes from the replica running it for that replica's ``lease_ttl``: it died.
        """
        floor = version_int(after)
        low = floor or -1  # versions after ``after`` (every one if it is MISSING) are above it
        mark = floor  # a logged event is delivered once, if above this: ``after`` or the last
        watch = _OwnerWatch(self.leases.ttl, self._log.options)
        tap, failure = telemetry.subscription(), None  # None without an SDK: no cost per event
        reader = None
        try:
            # One generator, over the feed's reader (not over ``listener.follow``): each
            # delivery resumes one generator frame, and a waiting subscriber holds one future.
            reader = await self._log.listener.open(
                task_id, lambda: self._backlog(task_id, after, watch), idle_timeout=watch.timeout
            )
            while True:
                entry = reader.take()
                if entry is None:
                    if reader.finished:
                        return
                    await reader.more()
                    continue
                version = entry.version
                view = entry.view or _view(entry)
                if view is None:  # no event: a queue's close mark, or an undecodable entry
                    _check_needed(entry, floor, mark)
                    continue
                shared, activity, logged = view
                if version <= (mark if logged else low):  # not after ``after``, or delivered
                    del entry, view, shared  # an idle subscriber must not pin the last event
                    continue
                if logged:
                    mark = version
                if activity is not Activity.SILENT:
                    watch.running = activity is Activity.RUNNING
                if tap is not None:
                    tap.delivered(entry.context)
                del entry, view
                yield shared
                del shared
        except BaseException as e:
            failure = e
            raise
        finally:
            if tap is not None:
                tap.close(failure)
            if reader is not None:
                await reader.close()
