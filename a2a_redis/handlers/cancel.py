"""Recording CANCELED when no replica runs the task's agent: one version-checked write.

The SDK's remote cancel copies the task it read, sets CANCELED and saves it without a
version check (the CANCELED exception of the versioned store's contract), so a chunk the
agent saved in between is erased from the stored task. Both of our handlers record CANCELED
here instead: on the latest stored task, at its version, re-read and retried while the task
stays non-terminal, so the CANCELED task keeps every artifact stored before it.
"""

from __future__ import annotations

from a2a.server.cluster import ConcurrentTaskModificationError, TaskVersion
from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import Task, TaskState, TaskStatus, TaskStatusUpdateEvent
from a2a.utils.errors import TaskNotFoundError

from a2a_redis.log.codec import TERMINAL_STATES
from a2a_redis.stores.task_store import VersionedRedisTaskStore

__all__ = ["record_cancel"]


async def record_cancel(
    store: VersionedRedisTaskStore, task_id: str, context: ServerCallContext
) -> tuple[Task, TaskVersion, TaskStatusUpdateEvent]:
    """Write CANCELED on the owner's latest ``task_id``; the task, its version, the event.

    Raises ``TaskNotFoundError`` if the owner has no such task, and the SDK's
    ``ConcurrentTaskModificationError`` if it is terminal (read again: it may be CANCELED
    by a concurrent cancel). Round trips: 1 read and 2 per write attempt.
    """
    for _ in range(store.options.max_attempts):
        stored = await store.get(task_id, context)
        if stored is None:
            raise TaskNotFoundError
        if stored.task.status.state in TERMINAL_STATES:
            raise ConcurrentTaskModificationError(task_id)
        cancelled = Task()
        cancelled.CopyFrom(stored.task)
        cancelled.status.CopyFrom(TaskStatus(state=TaskState.TASK_STATE_CANCELED))
        cancelled.status.timestamp.GetCurrentTime()
        event = TaskStatusUpdateEvent(
            task_id=task_id, context_id=cancelled.context_id, status=cancelled.status
        )
        try:
            with store.strict_cancel():
                version = await store.save(
                    cancelled, event=event, prev_version=stored.version, context=context
                )
        except ConcurrentTaskModificationError:
            continue  # the agent wrote meanwhile: cancel what it wrote
        return cancelled, version, event
    raise ConcurrentTaskModificationError(task_id)
