"""``OnControlPlane``: what both handlers share of the backend's control plane.

The control plane (its control channel and its orphan reaper) starts at a replica's first
request of any kind, since an app is built before its event loop runs. The overrides here
start it, then do exactly what the SDK's methods do.
"""

from __future__ import annotations

from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import (
    GetTaskRequest,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    SendMessageRequest,
    Task,
)

from a2a_redis.events.control import ControlPlane

__all__ = ["OnControlPlane"]


class OnControlPlane:
    """A mixin, before the SDK's handler class: the control plane starts at any request."""

    _control: ControlPlane | None

    def _start_control(self) -> None:
        if self._control is not None:
            self._control.ensure_started()

    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext) -> Task | None:
        """The SDK's ``on_get_task``."""
        self._start_control()
        result: Task | None = await super().on_get_task(params, context)  # type: ignore[misc]
        return result

    async def on_list_tasks(
        self, params: ListTasksRequest, context: ServerCallContext
    ) -> ListTasksResponse:
        """The SDK's ``on_list_tasks``."""
        self._start_control()
        result: ListTasksResponse = await super().on_list_tasks(params, context)  # type: ignore[misc]
        return result

    async def on_message_send(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> Message | Task:
        """The SDK's ``on_message_send``."""
        self._start_control()
        result: Message | Task = await super().on_message_send(params, context)  # type: ignore[misc]
        return result
