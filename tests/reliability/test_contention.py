"""64 concurrent writers on one task through the SDK's handlers (two replicas, one Redis).

Each replica is a ``DefaultRequestHandler`` in cluster mode over its own ``RedisBackend``.
The handlers write through a recording view of the backend's store: a write is *accepted*
when ``save`` returned a version to the SDK. The invariants, whatever the SDK then made of
its conflicts (it retries once, then fails the task):

* every accepted write is in the store's history: the accepted versions are exactly
  1..N, where N is the stored version (no lost write, no two writers at one version);
* the task's event log (its Redis stream) is exactly the accepted writes, in version
  order, with strictly increasing versions.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from a2a.helpers.proto_helpers import get_message_text, new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.cluster import (
    ConcurrentTaskModificationError,
    StoredTask,
    TaskVersion,
    VersionedEvent,
    VersionedTaskStore,
)
from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event
from a2a.server.events.event_queue_v2 import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.tasks.task_manager import TaskManager
from a2a.server.tasks.task_updater import TaskUpdater
from a2a.types.a2a_pb2 import (
    Artifact,
    CancelTaskRequest,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    Part,
    Role,
    SendMessageRequest,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
)
from a2a.utils.errors import A2AError

from a2a_redis import RedisBackend
from a2a_redis.log.codec import decode_event, version_int
from tests.helpers import agent_card, ctx, make_task, send_request, state_of

S = TaskState
GUARD = 60.0  # seconds: a hang guard only
WRITERS = 64


@dataclass(frozen=True)
class Accepted:
    version: int
    event: Event | None


class RecordingStore(VersionedTaskStore):
    """The backend's versioned store, noting every write it accepted (returned a version)."""

    def __init__(self, inner: VersionedTaskStore, log: list[Accepted]) -> None:
        self.inner = inner
        self.log = log

    async def save(
        self,
        task: Task,
        *,
        event: Event | None = None,
        prev: Task | None = None,
        prev_version: TaskVersion = TaskVersion.MISSING,
        context: ServerCallContext | None = None,
    ) -> TaskVersion:
        version = await self.inner.save(
            task, event=event, prev=prev, prev_version=prev_version, context=context
        )
        kept = None
        if event is not None:
            kept = type(event)()
            kept.CopyFrom(event)
        self.log.append(Accepted(version_int(version), kept))
        return version

    async def get(
        self, task_id: str, context: ServerCallContext | None = None
    ) -> StoredTask | None:
        return await self.inner.get(task_id, context)

    async def list(
        self, params: ListTasksRequest, context: ServerCallContext | None = None
    ) -> ListTasksResponse:
        return await self.inner.list(params, context)

    async def delete(self, task_id: str, context: ServerCallContext | None = None) -> None:
        await self.inner.delete(task_id, context)


class NoteAgent(AgentExecutor):
    """Each message adds one artifact named after it, then asks for input again.

    With ``hold`` set, the first run stays WORKING until the event is set (to be cancelled).
    """

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.hold = hold

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        if context.current_task is None:
            await event_queue.enqueue_event(new_task_from_user_message(context.message))
        await updater.start_work()
        if self.hold is not None:
            await self.hold.wait()
        name = get_message_text(context.message)
        await updater.add_artifact([Part(text=name)], artifact_id=name, name=name)
        await updater.requires_input()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        await updater.cancel()


@dataclass
class Replica:
    backend: RedisBackend
    handler: DefaultRequestHandler


@pytest.fixture
async def log() -> list[Accepted]:
    return []


async def make_replica(url: str, prefix: str, log: list[Accepted], agent: AgentExecutor) -> Replica:
    backend = RedisBackend.from_url(url, prefix=prefix)
    handler = DefaultRequestHandler(
        agent_executor=agent,
        task_store=RecordingStore(backend.task_store, log),
        agent_card=agent_card(),
        event_stream=backend.event_stream,
    )
    return Replica(backend, handler)


@pytest.fixture
async def replicas(
    real_url: str, prefix: str, log: list[Accepted]
) -> AsyncIterator[tuple[Replica, Replica]]:
    made = [await make_replica(real_url, prefix, log, NoteAgent()) for _ in range(2)]
    try:
        yield made[0], made[1]
    finally:
        for replica in made:
            await replica.handler.aclose()
            await replica.backend.aclose()


def follow_up(task: Task, text: str) -> SendMessageRequest:
    return SendMessageRequest(
        message=Message(
            role=Role.ROLE_USER,
            message_id=uuid.uuid4().hex,
            task_id=task.id,
            context_id=task.context_id,
            parts=[Part(text=text)],
        )
    )


async def _rest(events: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in events]


async def check_log_is_the_accepted_writes(
    backend: RedisBackend, task_id: str, log: list[Accepted]
) -> list[int]:
    stored = await backend.task_store.get(task_id, ctx())
    assert stored is not None
    accepted = sorted(log, key=lambda a: a.version)
    versions = [a.version for a in accepted]
    assert versions == list(range(1, version_int(stored.version) + 1))  # none lost, none twice
    key = backend.task_store.keys.events(task_id)
    entries = [decode_event(key, fields) for _, fields in await backend.redis.xrange(key)]
    logged = [v for v, _ in entries]
    assert all(b > a for a, b in itertools.pairwise(logged))  # strictly increasing
    expected = [(a.version, a.event) for a in accepted if a.event is not None]
    assert entries == expected  # the event log is exactly the accepted writes
    return versions


async def test_64_concurrent_follow_ups_through_two_handlers(replicas, log):
    """Streaming follow-ups, 32 per replica: each stream ends when its own request ends.

    Each replica runs its requests one at a time; the two replicas' runs race in the store.
    On a lost race the SDK reloads and retries once, and fails the task on a second one: how
    many follow-ups get through is the SDK's business, what was accepted is ours.
    """
    a, b = replicas
    first = await a.handler.on_message_send(send_request("n-start"), ctx())
    assert isinstance(first, Task) and first.status.state == S.TASK_STATE_INPUT_REQUIRED

    async def send(replica: Replica, n: int) -> list[Event] | A2AError:
        events = []
        try:
            async for event in replica.handler.on_message_send_stream(
                follow_up(first, f"n-{n}"), ctx()
            ):
                events.append(event)
        except A2AError as e:
            return e
        return events

    await asyncio.wait_for(
        asyncio.gather(*(send(a if n % 2 else b, n) for n in range(WRITERS))), GUARD
    )
    versions = await check_log_is_the_accepted_writes(a.backend, first.id, log)
    stored = await a.backend.task_store.get(first.id, ctx())
    assert stored is not None
    names = {artifact.artifact_id for artifact in stored.task.artifacts}
    noted = {
        e.event.artifact.artifact_id for e in log if isinstance(e.event, TaskArtifactUpdateEvent)
    }
    assert noted <= names  # every accepted artifact write is in the final task
    assert versions  # (typically about half the follow-ups get through, ~130 writes)


async def test_64_concurrent_task_managers_through_two_handlers_stores(replicas, log):
    """The SDK's own write path (``TaskManager``, as the handler's consumer uses it) in 64
    concurrent writers, each retrying its lost races as the SDK does (invalidate, reload,
    process again) until its artifact is accepted: all 64 are, and nothing is lost."""
    a, b = replicas
    first = await a.handler.on_message_send(send_request("n-start"), ctx())
    assert isinstance(first, Task)

    async def write(replica: Replica, n: int) -> None:
        manager = TaskManager(
            task_store=replica.handler.task_store,
            context=ctx(),
            task_id=first.id,
            context_id=first.context_id,
            initial_message=None,
        )
        event = TaskArtifactUpdateEvent(
            task_id=first.id,
            context_id=first.context_id,
            artifact=Artifact(artifact_id=f"w-{n}", parts=[Part(text=f"w-{n}")]),
        )
        for _ in range(WRITERS * 4):  # bounded: each lost race means another write won
            try:
                await manager.process(event)
                return
            except ConcurrentTaskModificationError:
                manager.invalidate()
                await manager.get_task()
        raise AssertionError(f"writer {n} never got through")

    await asyncio.wait_for(
        asyncio.gather(*(write(a if n % 2 else b, n) for n in range(WRITERS))), GUARD
    )
    versions = await check_log_is_the_accepted_writes(a.backend, first.id, log)
    stored = await a.backend.task_store.get(first.id, ctx())
    assert stored is not None
    written = {x.artifact_id for x in stored.task.artifacts if x.artifact_id.startswith("w-")}
    assert written == {f"w-{n}" for n in range(WRITERS)}  # every accepted write is kept
    assert len(versions) >= WRITERS


@pytest.mark.parametrize("via", ["both", "remote"])
async def test_64_concurrent_cancels_through_two_handlers_write_canceled_once(
    real_url: str, prefix: str, log: list[Accepted], via: str
):
    """64 cancels of a running task: through both replicas, or all through B while the agent
    runs on A (A finds out at its next save, reloads, and republishes the CANCELED task)."""
    hold = asyncio.Event()
    made = [await make_replica(real_url, prefix, log, NoteAgent(hold)) for _ in range(2)]
    a, b = made
    try:
        events = a.handler.on_message_send_stream(send_request("n-start"), ctx())
        task = await anext(events)
        assert isinstance(task, Task)
        while (await anext(events)).status.state != S.TASK_STATE_WORKING:  # type: ignore[union-attr]
            pass

        async def cancel(replica: Replica) -> Task | A2AError:
            try:
                result = await replica.handler.on_cancel_task(CancelTaskRequest(id=task.id), ctx())
            except A2AError as e:
                return e
            assert isinstance(result, Task)
            return result

        results = await asyncio.wait_for(
            asyncio.gather(*(cancel(a if n % 2 and via == "both" else b) for n in range(WRITERS))),
            GUARD,
        )
        hold.set()  # A's agent goes on: its next save loses to the cancel
        rest = await asyncio.wait_for(_rest(events), GUARD)  # A's stream ends, at CANCELED
        assert state_of(rest[-1]) == S.TASK_STATE_CANCELED
        for result in results:  # CANCELED, or refused because it already was
            if isinstance(result, Task):
                assert result.status.state == S.TASK_STATE_CANCELED
            else:
                assert type(result).__name__ == "TaskNotCancelableError"
        assert any(isinstance(r, Task) for r in results)
        await check_log_is_the_accepted_writes(a.backend, task.id, log)
        canceled = [
            entry
            for entry in log
            if getattr(entry.event, "status", None) is not None
            and entry.event.status.state == S.TASK_STATE_CANCELED  # type: ignore[union-attr]
        ]
        assert len(canceled) == 1  # one accepted cancel; every other one saw it and agreed
    finally:
        hold.set()
        for replica in made:
            await replica.handler.aclose()
            await replica.backend.aclose()


async def test_a_republished_event_is_not_logged_twice(replicas):
    """What the remote-cancel race above showed, in isolation: B's stream (whose store did
    not write version 2) is handed a copy of A's version-2 state, as the SDK republishes a
    task it reloaded; the log keeps one entry per version. A Message reply is always kept."""
    a, b = replicas
    task = make_task("t", state=S.TASK_STATE_WORKING)
    v1 = await a.backend.task_store.save(
        task, event=task, prev_version=TaskVersion.MISSING, context=ctx()
    )
    task.status.state = S.TASK_STATE_CANCELED
    v2 = await a.backend.task_store.save(task, event=task, prev_version=v1, context=ctx())
    await b.backend.event_stream.publish("t", VersionedEvent(task, v2))  # a copy: dropped
    await b.backend.event_stream.publish("t", VersionedEvent(task, v1))  # older: dropped
    reply = Message(role=Role.ROLE_AGENT, message_id="m", parts=[Part(text="bye")])
    await b.backend.event_stream.publish("t", VersionedEvent(reply, v2))  # a reply: kept
    key = a.backend.task_store.keys.events("t")
    entries = [decode_event(key, f) for _, f in await a.backend.redis.xrange(key)]
    assert [(v, type(e).__name__) for v, e in entries] == [(1, "Task"), (2, "Task"), (2, "Message")]
