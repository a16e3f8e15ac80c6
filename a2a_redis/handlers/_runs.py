"""The pieces of ``RedisLegacyRequestHandler``'s bookkeeping of the agents it runs.

A run is one execution of the agent on this replica; the agent writes through its gate, a
cancel's ``AgentExecutor.cancel`` through a watch, and the handler's task store reports each
save, so a cancel can wait for what the run's consumer stored (see ``legacy.py``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from a2a.server.context import ServerCallContext
from a2a.server.events import Event, EventQueueLegacy
from a2a.server.events.event_queue import EventQueue
from a2a.server.tasks import TaskStore
from a2a.types.a2a_pb2 import (
    ListTasksRequest,
    ListTasksResponse,
    Message,
    Part,
    Role,
    Task,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)

__all__ = ["CONSUMER_FINAL", "TERMINAL", "Gate", "ReportingStore", "Run", "Watch", "status_event"]

logger = logging.getLogger(__name__)

S = TaskState
TERMINAL = frozenset({S.TASK_STATE_COMPLETED, S.TASK_STATE_CANCELED, S.TASK_STATE_FAILED,
                      S.TASK_STATE_REJECTED})  # fmt: skip
#: The task states at which the SDK's ``EventConsumer`` stops (it stops at a Message too).
CONSUMER_FINAL = TERMINAL | {S.TASK_STATE_INPUT_REQUIRED, S.TASK_STATE_UNSPECIFIED}


def status_event(task_id: str, context_id: str, state: int, text: str) -> TaskStatusUpdateEvent:
    """A status update to ``state`` now, with an agent message saying ``text``."""
    status = TaskStatus(state=state)  # type: ignore[arg-type]
    status.timestamp.GetCurrentTime()
    status.message.CopyFrom(
        Message(role=Role.ROLE_AGENT, message_id=uuid.uuid4().hex, task_id=task_id,
                context_id=context_id, parts=[Part(text=text)])
    )  # fmt: skip
    return TaskStatusUpdateEvent(task_id=task_id, context_id=context_id, status=status)


class Gate(EventQueue):
    """What the agent's ``execute`` writes to: the task's queue, until the run ends.

    ``state``: ``open``; ``finished`` once the producer ended the run itself; ``taken`` once
    a cancel took it over. Only ``open`` forwards; ``lock`` orders the two endings and waits
    for an event in flight.
    """

    def __init__(self, queue: EventQueueLegacy) -> None:
        self.queue = queue
        self.state = "open"
        self.lock = asyncio.Lock()
        self.replied = False  # the agent sent a Message (its consumer stops there, unsaved)

    async def enqueue_event(self, event: Event) -> None:
        async with self.lock:
            if self.state == "open":
                self.replied = self.replied or isinstance(event, Message)
                await self.queue.enqueue_event(event)
                return
        logger.debug("dropped a %s from an agent being cancelled", type(event).__name__)


class Watch(EventQueue):
    """What the agent's ``cancel`` writes to: the task's queue, noting a terminal event."""

    def __init__(self, queue: EventQueueLegacy) -> None:
        self.queue = queue
        self.ended = False

    async def enqueue_event(self, event: Event) -> None:
        await self.queue.enqueue_event(event)
        if isinstance(event, Task | TaskStatusUpdateEvent) and event.status.state in TERMINAL:
            self.ended = True


@dataclass(eq=False)
class Run:
    """One execution of the agent on this replica."""

    task_id: str
    context: ServerCallContext  # of the request that started it
    queue: EventQueueLegacy
    producer: asyncio.Task[Any]
    gate: Gate
    final: asyncio.Future[Task | None]  # its consumer's save where it stops; None: failed
    takeover: asyncio.Task[Task | None] | None = None
    taken_over: bool = False  # the takeover is over


class ReportingStore(TaskStore):
    """The handler's task store, reporting each save (and whether it failed) to ``report``."""

    def __init__(self, store: TaskStore, report: Callable[[Task, bool], Awaitable[None]]) -> None:
        self.store = store
        self._report = report

    async def save(self, task: Task, context: ServerCallContext) -> None:
        try:
            await self.store.save(task, context)
        except Exception:
            await self._report(task, False)
            raise
        await self._report(task, True)

    async def get(self, task_id: str, context: ServerCallContext) -> Task | None:
        return await self.store.get(task_id, context)

    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        return await self.store.list(params, context)

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        await self.store.delete(task_id, context)
