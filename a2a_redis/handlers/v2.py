"""``RedisRequestHandler``: the SDK's V2 handler, with cancels that cross replicas.

The SDK's ``DefaultRequestHandlerV2.on_cancel_task`` cancels locally when this replica's
registry holds the task; otherwise (``_cancel_remote``) it writes CANCELED onto the copy of
the task it read, skipping the version check, and the replica running the agent notices only
at its next save, so a silent agent runs on, and a chunk saved in between can be erased.

Here ``_cancel_remote`` first forwards the cancel to the replica that holds the task's lease
(:class:`~a2a_redis.events.control.ControlPlane`); that replica runs ``cancel_here``, which
is the SDK's own local cancel (``AgentExecutor.cancel``, then the producer is stopped) with
the call context of the request that runs the task, and its answer is returned. Only when no
replica holds the lease, or it does not answer within ``cancel_timeout``, is CANCELED
recorded here, and then on the latest stored task at its version (``_write_cancel``), so it
keeps every artifact stored before it.

Differences from the SDK's code, deliberately: ``_cancel_remote`` forwards first;
``_write_cancel`` records CANCELED with :func:`~a2a_redis.handlers.cancel.record_cancel`
(on the latest task, version-checked) instead of overwriting a stale copy; and the agent
executor is wrapped in :class:`~a2a_redis.handlers.executor.VisibleCancel`, so that a
cancel always ends the task's streams with a CANCELED event (the SDK records CANCELED after
its queues closed when the agent's ``cancel`` enqueues nothing, and a streaming client never
sees it).
"""

from __future__ import annotations

import asyncio
from typing import Any

from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    Task,
)

from a2a_redis.events.control import ControlPlane
from a2a_redis.handlers.base import OnControlPlane
from a2a_redis.handlers.cancel import record_cancel
from a2a_redis.handlers.executor import VisibleCancel
from a2a_redis.stores.task_store import VersionedRedisTaskStore

__all__ = ["RedisRequestHandler"]


class RedisRequestHandler(OnControlPlane, DefaultRequestHandler):
    """``DefaultRequestHandler`` (V2, cluster mode) whose cancels reach the running agent.

    Args:
        control: The backend's control plane.
        args, kwargs: Those of the SDK's ``DefaultRequestHandler``; ``task_store`` must be
            a :class:`VersionedRedisTaskStore`.
    """

    def __init__(self, *args: Any, control: ControlPlane, **kwargs: Any) -> None:
        if args:
            args = (VisibleCancel(args[0]), *args[1:])
        else:
            kwargs["agent_executor"] = VisibleCancel(kwargs["agent_executor"])
        super().__init__(*args, **kwargs)
        self._control: ControlPlane = control
        self._cancelling: dict[str, asyncio.Future[Task]] = {}
        control.register(self)

    async def on_cancel_task(
        self, params: CancelTaskRequest, context: ServerCallContext
    ) -> Task | None:
        """The SDK's (and starts the control plane); see ``_cancel_remote``."""
        self._start_control()
        result: Task | None = await super().on_cancel_task(params, context)
        return result

    async def _cancel_local(self, task_id: str, context: ServerCallContext) -> Task:
        """The SDK's local cancel, once per task at a time.

        Concurrent cancels (local, or forwarded from other replicas) share it, so the
        agent's ``cancel`` runs once, and one CANCELED is written.
        """
        running = self._cancelling.get(task_id)
        if running is None:
            running = asyncio.ensure_future(super()._cancel_local(task_id, context))
            self._cancelling[task_id] = running
            running.add_done_callback(lambda _: self._cancelling.pop(task_id, None))
        result: Task = await asyncio.shield(running)
        return result

    async def stop_here(self, task_id: str) -> bool:
        """Stop ``task_id``'s agent here if its stored task was ended by another writer.

        Called when the lease renewal finds the record terminal: a cancel recorded by
        another replica, or the orphan reaper. Nothing if the agent does not run here, or if
        the terminal write was this replica's own (the stored version is the one it wrote).
        """
        active = await self._active_task_registry.get(task_id)
        if active is None or active.is_finished:
            return False
        manager = active._task_manager
        stored = await self._versioned_store.get(task_id, manager._call_context)
        if stored is None or stored.version == manager.current_version:
            return False
        await self._cancel_local(task_id, manager._call_context)
        return True

    async def cancel_here(self, task_id: str) -> Task | None:
        """Cancel ``task_id`` as a local cancel does, if it runs here; else None.

        Uses the call context of the request that runs the task: the replica that received
        the cancel checked the caller's ownership already.
        """
        active = await self._active_task_registry.get(task_id)
        if active is None:
            return None
        context: ServerCallContext = active._task_manager._call_context
        return await self._cancel_local(task_id, context)

    async def _cancel_remote(
        self, task_id: str, task: Task, version: TaskVersion, context: ServerCallContext
    ) -> Task:
        cancelled = await self._control.forward_cancel(task_id)
        if cancelled is not None:
            return cancelled
        return await super()._cancel_remote(task_id, task, version, context)

    async def _write_cancel(
        self, task_id: str, current: Task, version: TaskVersion, context: ServerCallContext
    ) -> Task:
        """Record CANCELED on the latest stored task, at its version (``cancel.py``)."""
        store = self._versioned_store
        assert isinstance(store, VersionedRedisTaskStore)
        cancelled, new_version, event = await record_cancel(store, task_id, context)
        if self._event_stream is not None:
            await self._event_stream.publish(task_id, VersionedEvent(event, new_version))
        return cancelled
