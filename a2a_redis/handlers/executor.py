"""``VisibleCancel``: an agent's cancel always ends its task's streams with CANCELED.

The SDK asks ``AgentExecutor.cancel(context, event_queue)`` to stop the agent; a well-made
agent also enqueues a CANCELED status there (``TaskUpdater.cancel()``), and that event is
what ends every open stream of the task, here and on other replicas. An agent that only
stops (the SDK's own samples do) leaves the streams without a last event: the handler then
records CANCELED in the store after the queues closed, and a client that was streaming sees
its stream stop at the last chunk.

``VisibleCancel`` wraps the user's executor: it runs the user's ``cancel`` with a queue that
notes whether a terminal status went through it, and enqueues the CANCELED status itself if
none did. ``execute`` is the user's, untouched.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events.event_queue import Event, EventQueue
from a2a.types.a2a_pb2 import Task, TaskState, TaskStatus, TaskStatusUpdateEvent

from a2a_redis.log.codec import TERMINAL_STATES

__all__ = ["VisibleCancel"]


class _Watched:
    """An event queue that notes whether a terminal status was enqueued through it."""

    def __init__(self, queue: EventQueue) -> None:
        self._queue = queue
        self.ended = False

    async def enqueue_event(self, event: Event) -> None:
        if isinstance(event, TaskStatusUpdateEvent | Task):
            self.ended = self.ended or event.status.state in TERMINAL_STATES
        await self._queue.enqueue_event(event)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


class VisibleCancel(AgentExecutor):
    """The user's executor, whose ``cancel`` always leaves a CANCELED status event.

    Args:
        executor: The user's ``AgentExecutor``.
    """

    def __init__(self, executor: AgentExecutor) -> None:
        self.executor = executor

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        """The user's ``execute``."""
        await self.executor.execute(context, event_queue)

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """The user's ``cancel``; then CANCELED, unless it enqueued a terminal status."""
        watched = _Watched(event_queue)
        await self.executor.cancel(context, watched)  # type: ignore[arg-type]
        if watched.ended or not context.task_id:
            return
        status = TaskStatus(state=TaskState.TASK_STATE_CANCELED)
        status.timestamp.FromDatetime(datetime.now(timezone.utc))
        await event_queue.enqueue_event(
            TaskStatusUpdateEvent(
                task_id=context.task_id, context_id=context.context_id or "", status=status
            )
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.executor, name)
