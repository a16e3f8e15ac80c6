"""``EventPlumbing``: the Redis plumbing the event stream and the queue manager share.

Both stand on one mechanism: each task's event log (``log/event_log.py``), one live listener
and one lease keeper per process. This holds what they need of it, once: the namespace's
keys and options, the shared listener and lease keeper (or their own, made here and closed
by :meth:`EventPlumbing.aclose`), the joins' shared backlog reads (``backlog.py``), and the
one way both write to a task's log, with writes grouped across tasks (``appends.py``).
"""

from __future__ import annotations

from a2a.server.events.event_queue import Event

from a2a_redis.connection.cluster import Client
from a2a_redis.connection.transaction import Command, run_atomically
from a2a_redis.events.appends import EntryPacker, GroupedAppends, Write
from a2a_redis.events.backlog import Backlog
from a2a_redis.events.leases import LeaseKeeper
from a2a_redis.events.listener import StreamListener
from a2a_redis.log.codec import ends_task_stream
from a2a_redis.log.event_log import append_commands
from a2a_redis.log.keys import Keys
from a2a_redis.options import Options

__all__ = ["EventPlumbing", "OnEventPlumbing"]


class EventPlumbing:
    """Keys, options, listener and leases of one namespace, and atomic log writes.

    Args:
        redis: The shared client; not owned.
        options: The namespace's options.
        listener: The process's shared listener; None makes one, closed by :meth:`aclose`.
        leases: The process's shared lease keeper; None makes one, closed by :meth:`aclose`.
    """

    def __init__(
        self,
        redis: Client,
        options: Options,
        *,
        listener: StreamListener | None = None,
        leases: LeaseKeeper | None = None,
    ) -> None:
        self.redis = redis
        self.options = options
        self.keys = Keys.for_client(redis, options.prefix)
        self._owns_listener = listener is None
        self.listener = StreamListener(redis, self.keys) if listener is None else listener
        self._owns_leases = leases is None
        self.leases = (
            LeaseKeeper(redis, self.keys, ttl=options.lease_ttl) if leases is None else leases
        )
        #: Joins' backlog reads, shared per task and pipelined across tasks.
        self.backlogs = Backlog(redis, self.listener, self.keys)
        #: Writes to tasks' logs, grouped across concurrently writing tasks.
        self.appends = GroupedAppends(redis)
        self._packer = EntryPacker(
            self.keys, options.stream_retention, max_bytes=options.max_payload_bytes
        )

    def append_commands(self, task_id: str, version: int, event: Event) -> list[Command]:
        """The commands appending ``event`` at ``version`` to the task's log, with its wake-up.

        Raises ``PayloadTooLargeError`` if the event is over ``max_payload_bytes``.
        """
        return append_commands(
            self.keys, task_id, version, event,
            terminal=ends_task_stream(event), retention=self.options.stream_retention,
            max_bytes=self.options.max_payload_bytes,
        )  # fmt: skip

    async def append(self, operation: str, task_id: str, version: int, event: Event) -> None:
        """Append ``event`` at ``version`` to the task's log, with its wake-up.

        Returns once the entry is in the stream; concurrent appends share round trips
        (:class:`~a2a_redis.events.appends.GroupedAppends`). Raises ``PayloadTooLargeError``
        if the event is over ``max_payload_bytes``.
        """
        write = self._packer.write(operation, task_id, version, event)
        await self.appends.write(write, self.options.durability)

    async def write(self, operation: str, task_id: str, commands: list[Command]) -> None:
        """:meth:`run`, grouped with the writes of other tasks made meanwhile."""
        write = Write.of(operation, self.keys.events(task_id), commands)
        await self.appends.write(write, self.options.durability)

    def forget(self, task_id: str) -> None:
        """Drop what :meth:`append` keeps of the task (its writer is done with it)."""
        self._packer.forget(task_id)

    async def run(self, operation: str, task_id: str, commands: list[Command]) -> None:
        """Run log commands for ``task_id`` atomically: one round trip (and ``WAIT``)."""
        await run_atomically(
            self.redis, operation, self.keys.events(task_id), commands, self.options.durability
        )

    async def aclose(self) -> None:
        """Close the listener and lease keeper made here (shared ones stay open)."""
        try:
            await self.appends.aclose()
            if self._owns_leases:
                await self.leases.aclose()
        finally:
            if self._owns_listener:
                await self.listener.aclose()


class OnEventPlumbing:
    """The public view both components give of their plumbing (for health checks)."""

    _log: EventPlumbing

    @property
    def redis(self) -> Client:
        """The client this component uses (not owned)."""
        return self._log.redis

    @property
    def listener(self) -> StreamListener:
        """The process's listener."""
        return self._log.listener

    @property
    def leases(self) -> LeaseKeeper:
        """The process's lease keeper: the leases of the tasks this replica runs."""
        return self._log.leases
