"""Helpers shared by the tests."""

from __future__ import annotations

from a2a.auth.user import User
from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import Task, TaskState, TaskStatus


class NamedUser(User):
    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def is_authenticated(self) -> bool:
        return bool(self._name)

    @property
    def user_name(self) -> str:
        return self._name


def ctx(owner: str = "alice") -> ServerCallContext:
    """A call context whose user (and so owner) is ``owner``."""
    return ServerCallContext(user=NamedUser(owner))


def make_task(
    task_id: str,
    *,
    context_id: str = "ctx",
    state: int = TaskState.TASK_STATE_SUBMITTED,
    ts_ns: int | None = None,
) -> Task:
    """A task in ``state``, with a status timestamp of ``ts_ns`` nanoseconds if given."""
    task = Task(id=task_id, context_id=context_id, status=TaskStatus(state=state))
    if ts_ns is not None:
        task.status.timestamp.FromNanoseconds(ts_ns)
    return task
