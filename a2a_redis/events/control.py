"""Cross-replica control: a cancel goes to the replica that runs the task.

Each replica (one :class:`ControlPlane` per backend) listens on its own control channel,
``keys.control(replica)``, on the process's one pub/sub transport. A lease token names the
replica that holds it (``leases.py``), so a replica that receives a CancelTask for a task it
does not run reads the task's lease and sends the holder a request on its channel; the
holder cancels the task exactly as a local cancel does (its handlers' ``cancel_here``) and
publishes the resulting task on the sender's channel. Owner scoping is the receiving
handler's: it checked the caller's ownership before asking.

The sender waits ``cancel_timeout`` seconds at most. No lease, the holder's answer that it
does not run the task, or no answer in time: :meth:`ControlPlane.forward_cancel` returns
None and the handler records CANCELED itself, as the SDK does. Pub/sub can lose a request
or a reply when a connection drops; that costs the timeout, never a wrong answer, because
the fallback is a versioned write that a terminal state refuses.

If a request or its reply is lost (a pub/sub connection dropping, a holder too slow), the
agent is still stopped: at its next lease renewal (``lease_ttl / 3``) the holder finds its
task's record terminal and calls its handlers' ``stop_here`` (also what stops an agent whose
task the orphan reaper ended while its replica was only frozen).

The plane also runs the process's orphan reaper (``orphans.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any, Protocol, cast

import msgpack
from a2a.types.a2a_pb2 import Task
from a2a.utils.errors import TaskNotCancelableError

from a2a_redis import telemetry
from a2a_redis.errors import redis_errors
from a2a_redis.events.orphans import OrphanReaper
from a2a_redis.events.plumbing import EventPlumbing
from a2a_redis.events.tokens import replica_of
from a2a_redis.stores.records import TaskRecords

__all__ = ["Canceller", "ControlPlane"]

logger = logging.getLogger(__name__)

_NOT_HERE = "not-here"
_NOT_CANCELABLE = "not-cancelable"


class Canceller(Protocol):
    """A request handler that can cancel, as a local cancel does, a task it runs."""

    async def cancel_here(self, task_id: str) -> Task | None:
        """The task after cancelling it here, or None if its agent does not run here."""


class ControlPlane:
    """This replica's control channel, its forwarded cancels, and its orphan reaper.

    Args:
        records: The task record engine (for the reaper).
        log: The event plumbing: keys, options, the shared listener and lease keeper.
    """

    def __init__(self, records: TaskRecords, log: EventPlumbing) -> None:
        self._log = log
        self._redis = log.redis
        self._keys = log.keys
        self.replica = log.leases.replica
        self.reaper = OrphanReaper(records, log)
        self._channel = self._keys.control(self.replica).encode()
        self._cancellers: list[Canceller] = []
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._ready: asyncio.Future[None] | None = None
        self._closed = False
        self.forwarded = 0  # cancels sent to another replica
        self.answered = 0  # ... that it answered with the cancelled task
        self.fallbacks = 0  # ... that were recorded here instead (no answer, not there)
        self.served = 0  # cancels this replica ran for another
        self.stopped = 0  # agents stopped here because their task was ended elsewhere
        log.leases.on_ended = self._on_ended
        telemetry.observe("a2a_redis.cancels.forwarded", self, lambda plane: plane.forwarded)
        telemetry.observe("a2a_redis.orphans.failed", self, lambda p: p.reaper.tasks_failed)

    def _on_ended(self, task_id: str) -> None:
        """A task held here was ended by a write elsewhere: stop its agent here, if any."""
        if self._closed:
            return
        job = asyncio.ensure_future(self._stop(task_id))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _stop(self, task_id: str) -> None:
        for canceller in list(self._cancellers):
            stop = getattr(canceller, "stop_here", None)
            if stop is None:
                continue
            try:
                if await stop(task_id):
                    self.stopped += 1
                    logger.info("task %r was ended elsewhere; its agent here was stopped", task_id)
            except Exception as e:
                logger.warning("stopping task %r's agent here failed: %r", task_id, e)

    def register(self, canceller: Canceller) -> None:
        """Let forwarded cancels reach ``canceller`` (a request handler of this replica)."""
        if canceller not in self._cancellers:
            self._cancellers.append(canceller)

    def ensure_started(self) -> None:
        """Start listening and sweeping, once, in the running event loop (no round trip)."""
        if self._ready is None and not self._closed:
            self._ready = asyncio.ensure_future(self._start())

    async def _start(self) -> None:
        await self._log.listener.serve(self._channel, self._on_message)
        self.reaper.start()

    async def ready(self) -> None:
        """Wait until this replica hears its control channel (raises why it cannot)."""
        self.ensure_started()
        assert self._ready is not None
        try:
            await asyncio.shield(self._ready)
        except Exception:
            self._ready = None  # the next call tries again
            raise

    def stats(self) -> dict[str, int | str]:
        """Forwarded cancels and their outcomes, cancels served, and the reaper's counts."""
        return {
            "replica": self.replica,
            "cancels_forwarded": self.forwarded,
            "cancels_answered": self.answered,
            "cancels_fallen_back": self.fallbacks,
            "cancels_served": self.served,
            "agents_stopped": self.stopped,
            "orphan_sweeps": self.reaper.sweeps,
            "orphans_failed": self.reaper.tasks_failed,
            "dead_replicas_forgotten": self.reaper.replicas_reaped,
        }

    async def aclose(self) -> None:
        """Stop the reaper and the cancels this replica is serving."""
        self._closed = True
        await self.reaper.aclose()
        for job in list(self._jobs):
            job.cancel()
        for job in list(self._jobs):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await job
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()

    # -- the sending side -----------------------------------------------------------------
    async def forward_cancel(self, task_id: str) -> Task | None:
        """Have the replica running ``task_id`` cancel it; the task it answers with.

        None when no other replica holds the task's lease, when the holder does not run
        it, or when it does not answer within ``cancel_timeout``: record CANCELED here then.
        Raises ``TaskNotCancelableError`` if the holder found the task not cancelable.
        Round trips: 1 (GET of the lease), then 1 (PUBLISH) and the holder's answer.
        """
        lease = self._keys.lease(task_id)
        with redis_errors("read the task's lease", lease):
            token = cast("bytes | None", await self._redis.get(lease))
        holder = replica_of(token)
        if holder is None or holder == self.replica:
            return None
        await self.ready()
        request = uuid.uuid4().hex
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request] = answer
        self.forwarded += 1
        timeout = self._log.options.cancel_timeout
        try:
            await self._send(
                holder, {"op": "cancel", "id": request, "task": task_id, "from": self.replica}
            )
            reply = await asyncio.wait_for(answer, timeout)
        except asyncio.TimeoutError:
            self.fallbacks += 1
            logger.warning(
                "cancel of task %r: replica %s, which runs it, did not answer within %ss; "
                "recording CANCELED here (raise cancel_timeout if replicas are slow)",
                task_id, holder, timeout,
            )  # fmt: skip
            return None
        finally:
            self._pending.pop(request, None)
        if reply.get("task") is not None:
            self.answered += 1
            return Task.FromString(reply["task"])
        if reply.get("error") == _NOT_CANCELABLE:
            raise TaskNotCancelableError(message=str(reply.get("message") or ""))
        self.fallbacks += 1
        return None

    async def _send(self, replica: str, message: dict[str, Any]) -> None:
        channel = self._keys.control(replica)
        telemetry.inject(message)  # the sender's span, for the receiver's (W3C traceparent)
        with redis_errors("send a control message", channel):
            await self._redis.execute_command(
                self._keys.publish, channel, msgpack.packb(message, use_bin_type=True)
            )

    # -- the receiving side ---------------------------------------------------------------
    def _on_message(self, data: Any) -> None:
        """A request for this replica, or a reply to one of its requests (never raises)."""
        try:
            message = msgpack.unpackb(data, raw=False) if isinstance(data, bytes) else None
        except (ValueError, msgpack.UnpackException):
            message = None
        if not isinstance(message, dict):
            logger.warning("control channel %s: an unreadable message was ignored", self.replica)
            return
        if message.get("op") == "reply":
            answer = self._pending.get(str(message.get("id")))
            if answer is not None and not answer.done():
                answer.set_result(message)
        elif message.get("op") == "cancel" and not self._closed:
            job = asyncio.ensure_future(telemetry.served("serve cancel", message, self._serve))
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)

    async def _serve(self, request: dict[str, Any]) -> None:
        """Cancel the task here, if a handler of ours runs it; answer the sender."""
        task_id, sender = str(request.get("task")), str(request.get("from"))
        reply: dict[str, Any] = {"op": "reply", "id": request.get("id")}
        try:
            for canceller in list(self._cancellers):
                task = await canceller.cancel_here(task_id)
                if task is not None:
                    self.served += 1
                    reply["task"] = task.SerializeToString()
                    break
            else:
                reply["error"] = _NOT_HERE
        except TaskNotCancelableError as e:
            reply["error"], reply["message"] = _NOT_CANCELABLE, e.message
        except Exception as e:  # the sender falls back; say why here
            logger.warning("forwarded cancel of task %r failed here: %r", task_id, e)
            reply["error"] = type(e).__name__
        try:
            await self._send(sender, reply)
        except Exception as e:
            logger.warning("answer to replica %s about task %r was lost: %s", sender, task_id, e)
