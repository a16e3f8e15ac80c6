"""Helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import httpx
import redis.asyncio as aioredis
from a2a.auth.user import User
from a2a.client import Client, ClientCallContext, create_client
from a2a.helpers.proto_helpers import get_message_text, new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event, EventQueueLegacy, QueueShutDown
from a2a.server.tasks.task_updater import TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
)
from a2a.types.a2a_pb2 import (
    AuthenticationInfo,
    Task,
    TaskPushNotificationConfig,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from redis.asyncio.cluster import RedisCluster

from a2a_redis import RedisBackend, VersionedRedisTaskStore
from a2a_redis.connection.cluster import CLUSTER_SCHEMES, cluster_client, node_client
from a2a_redis.connection.compat import reply_pairs
from a2a_redis.log.keys import encode_id

T = TypeVar("T")


class NamedUser(User):
    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def is_authenticated(self) -> bool:
        return bool(self._name)

    @property
    def user_name(self) -> str:
        return self._name


async def eventually(
    condition: Callable[[], Any], *, timeout: float = 60.0, interval: float = 0.01, what: str = ""
) -> Any:
    """Wait until ``condition()`` is true (awaited when it returns an awaitable); return it.

    For a state the test cannot be notified of (a counter, a key, a subscription on the
    server). ``timeout`` is a hang guard only, never an asserted bound: past it the wait
    fails naming ``what``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or condition}")
        await asyncio.sleep(interval)


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


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ReplicaProcess:
    """``examples/agent_server.py`` in its own process: a replica the official client drives."""

    def __init__(self, name: str, redis_url: str, prefix: str, delay: float, *extra: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "agent_server.py"), "--port", str(self.port),
             "--redis-url", redis_url, "--prefix", prefix, "--name", name, "--delay", str(delay),
             *extra],
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip

    def wait_ready(self, guard: float = 60) -> None:
        """Wait (bounded) until the replica serves its agent card."""
        deadline = time.monotonic() + guard
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"replica {self.name} exited"
            try:
                if httpx.get(self.url + "/.well-known/agent-card.json", timeout=1).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"replica {self.name} did not start")

    def kill(self, guard: float = 30) -> None:
        """SIGKILL: the replica dies without cleaning anything up."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(guard)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the replica for the block (it sends nothing meanwhile), then SIGCONT."""
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def replica_pair(
    redis_url: str,
    prefix: str,
    delay: float,
    *extra: str,
    kind: Callable[..., ReplicaProcess] = ReplicaProcess,
) -> Iterator[tuple[ReplicaProcess, ReplicaProcess]]:
    """Replicas "A" and "B" (``kind(name, redis_url, prefix, delay, *extra)``) on one Redis,
    ready; stopped afterwards."""
    pair = (
        kind("A", redis_url, prefix, delay, *extra),
        kind("B", redis_url, prefix, delay, *extra),
    )
    try:
        for replica in pair:
            replica.wait_ready()
        yield pair
    finally:
        for replica in pair:
            replica.stop()


@contextlib.asynccontextmanager
async def client_pair(a: ReplicaProcess, b: ReplicaProcess) -> AsyncIterator[tuple[Client, Client]]:
    """The official a2a client of each replica; closed afterwards."""
    ca, cb = await create_client(a.url), await create_client(b.url)
    try:
        yield ca, cb
    finally:
        await ca.close()
        await cb.close()


def agent_card() -> AgentCard:
    """A spec-complete card for in-process handlers."""
    return AgentCard(
        name="paced",
        description="An agent whose pace the test sets.",
        version="1.0.0",
        capabilities=AgentCapabilities(streaming=True, push_notifications=False),
        default_input_modes=["text"],
        default_output_modes=["text"],
        skills=[
            AgentSkill(id="paced", name="paced", description="paced", tags=["test"], examples=["x"])
        ],
        supported_interfaces=[
            AgentInterface(
                protocol_binding="JSONRPC", protocol_version="1.0", url="http://test/a2a"
            )
        ],
    )


def push_card() -> AgentCard:
    """:func:`agent_card` with push notifications enabled (for the push-config calls)."""
    card = agent_card()
    card.capabilities.push_notifications = True
    return card


class ScriptedAgent(AgentExecutor):
    """Does what the first word of the message says: ``complete``, ``input`` or ``hold``.

    Each run emits the Task (first run only), WORKING and artifact ``a0``, then completes
    or asks for input; ``hold`` waits until the test releases the task (``gate(task_id)``
    or ``release_all``), then emits artifact ``a1`` and completes. Artifact texts are
    ``f"{artifact_text} {n}"``. ``cancel`` emits CANCELED.
    """

    def __init__(self, artifact_text: str = "done") -> None:
        self.artifact_text = artifact_text
        self.gates: dict[str, asyncio.Event] = {}

    def gate(self, task_id: str) -> asyncio.Event:
        """The event a held task waits for."""
        return self.gates.setdefault(task_id, asyncio.Event())

    def release_all(self) -> None:
        """Release every held task (and any held later)."""
        for gate in self.gates.values():
            gate.set()

    async def execute(self, context: RequestContext, event_queue: Any) -> None:
        assert context.message is not None and context.task_id and context.context_id
        kind = get_message_text(context.message).split()[0]
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        if context.current_task is None:
            await event_queue.enqueue_event(new_task_from_user_message(context.message))
        await updater.start_work()
        await updater.add_artifact([Part(text=f"{self.artifact_text} 0")], artifact_id="a0")
        if kind == "hold":
            await self.gate(context.task_id).wait()
            await updater.add_artifact([Part(text=f"{self.artifact_text} 1")], artifact_id="a1")
        if kind == "input":
            await updater.requires_input()
        else:
            await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: Any) -> None:
        assert context.task_id and context.context_id
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


def user_message(
    text: str, *, task_id: str = "", context_id: str = "", message_id: str = ""
) -> Message:
    """A user message with ``text`` (a fresh message id unless given)."""
    return Message(
        role=Role.ROLE_USER,
        message_id=message_id or uuid.uuid4().hex,
        parts=[Part(text=text)],
        task_id=task_id,
        context_id=context_id,
    )


def send_request(
    text: str,
    push: TaskPushNotificationConfig | None = None,
    *,
    task_id: str = "",
    context_id: str = "",
    message_id: str = "",
) -> SendMessageRequest:
    """A send of :func:`user_message`, carrying the push config ``push`` if given."""
    request = SendMessageRequest(
        message=user_message(text, task_id=task_id, context_id=context_id, message_id=message_id)
    )
    if push is not None:
        request.configuration.task_push_notification_config.CopyFrom(push)
    return request


def push_config(
    task_id: str, config_id: str, token: str, credentials: str, url: str = ""
) -> TaskPushNotificationConfig:
    """A push config with a token and Bearer credentials (its URL names it unless given)."""
    return TaskPushNotificationConfig(
        task_id=task_id,
        id=config_id,
        url=url or f"https://hooks.example/{config_id}",
        token=token,
        authentication=AuthenticationInfo(scheme="Bearer", credentials=credentials),
    )


def chunks(responses: list[StreamResponse]) -> list[str]:
    """Every artifact text in a client stream: the snapshot's, then each update's."""
    out = []
    for r in responses:
        if r.HasField("task"):
            out += [p.text for a in r.task.artifacts for p in a.parts]
        elif r.HasField("artifact_update"):
            out += [p.text for p in r.artifact_update.artifact.parts]
    return out


def final_state(responses: list[StreamResponse]) -> int:
    """The last task state a client stream reported."""
    for r in reversed(responses):
        if r.HasField("status_update"):
            return r.status_update.status.state
        if r.HasField("task"):
            return r.task.status.state
    raise AssertionError("no state in the stream")


async def drain_stream(
    stream: AsyncIterator[StreamResponse], seen: list[StreamResponse], first_chunk: Any
) -> None:
    """Keep every response; resolve ``first_chunk`` (with the task id) at the first chunk."""
    async for response in stream:
        seen.append(response)
        if response.HasField("artifact_update") and not first_chunk.done():
            first_chunk.set_result(response.artifact_update.task_id)


async def stream_until_chunk(
    stream: AsyncIterator[StreamResponse], guard: float = 30
) -> tuple[str, list[StreamResponse], asyncio.Task[None]]:
    """Drain a client stream in a task; return once its first chunk (an artifact update)
    has streamed: that chunk's task id, the responses (the task adds the rest), the task."""
    seen: list[StreamResponse] = []
    first_chunk = asyncio.get_running_loop().create_future()
    runner = asyncio.create_task(drain_stream(stream, seen, first_chunk))
    try:
        task_id = await asyncio.wait_for(asyncio.shield(first_chunk), guard)
    except BaseException:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        raise
    return task_id, seen, runner


async def start_stream(
    client: Client, text: str, guard: float = 30
) -> tuple[str, list[StreamResponse], asyncio.Task[None]]:
    """Start a streaming send; return its task id once the first chunk has streamed."""
    return await stream_until_chunk(client.send_message(send_request(text)), guard)


async def subscribe_live(
    client: Client, task_id: str, *, read_timeout: float, guard: float = 30
) -> tuple[list[StreamResponse], asyncio.Task[None]]:
    """Subscribe in a task; return once a live chunk (after the snapshot) arrived.

    ``read_timeout``: the client's (its default, 5 s, is shorter than a lease: no SSE comes
    while the server waits for a dead owner's heartbeat, and the stream must end from the
    server's side).
    """
    quiet = ClientCallContext(timeout=read_timeout)
    stream = client.subscribe(SubscribeToTaskRequest(id=task_id), context=quiet)
    _, seen, runner = await stream_until_chunk(stream, guard)
    return seen, runner


class Drive(Generic[T]):
    """Drives one async stream in a task, keeping every item, when it came (the loop's
    time) and the error the stream ended with.

    ``guard``: seconds, a hang guard only (for :meth:`until` and :meth:`finish`).
    """

    guard = 30.0

    def __init__(self, items: AsyncGenerator[T, None], *, guard: float | None = None) -> None:
        if guard is not None:
            self.guard = guard
        self.events: list[T] = []
        self.times: list[float] = []
        self.error: BaseException | None = None
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run(items))

    def _keep(self, item: T) -> T:
        """What to keep of an item (the item itself)."""
        return item

    def _last(self, item: T) -> bool:
        """Whether to stop after this item (never)."""
        return False

    def _shown(self) -> object:
        """What a failed :meth:`until` shows."""
        return self.events

    async def _run(self, items: AsyncGenerator[T, None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with aclosing(items) as it:
                async for item in it:
                    self.events.append(self._keep(item))
                    self.times.append(loop.time())
                    self._changed.set()
                    if self._last(item):
                        return
        except Exception as e:
            self.error = e
        finally:
            self._changed.set()

    async def until(self, n: int) -> list[T]:
        """Wait until at least ``n`` items arrived (fails if the stream ended first)."""

        async def wait() -> None:
            while len(self.events) < n and not self.task.done():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), self.guard)
        assert len(self.events) >= n, (self._shown(), self.error)
        return self.events

    async def finish(self) -> list[T]:
        """Wait for the stream to end; its items."""
        await asyncio.wait_for(asyncio.shield(self.task), self.guard)
        return self.events

    async def ended(self) -> BaseException | None:
        """Wait for the stream to end; the error it ended with (None: a clean end)."""
        await self.finish()
        return self.error

    async def close(self) -> None:
        """Stop following the stream."""
        if not self.task.done():
            self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class Tap(Drive[Event]):
    """Drives one handler stream in a task, keeping a copy of every event (and the error).

    Copies: the SDK's TaskManager goes on mutating the Task it emitted.
    """

    def _keep(self, item: Event) -> Event:
        kept = type(item)()
        kept.CopyFrom(item)
        return kept


class Follow(Drive[VersionedEvent]):
    """Drives one subscription (``RedisTaskEventStream.subscribe``) in a task.

    ``ns``: the ``n`` of each event (see :func:`numbered`), in the order they came. Given
    ``last``, the subscription ends after the event numbered ``last``.
    """

    def __init__(
        self,
        events: AsyncGenerator[VersionedEvent, None],
        *,
        last: int | None = None,
        guard: float | None = None,
    ) -> None:
        self.last = last
        super().__init__(events, guard=guard)

    @property
    def ns(self) -> list[int]:
        return [int(item.event.metadata["n"]) for item in self.events]

    def _last(self, item: VersionedEvent) -> bool:
        return self.last is not None and int(item.event.metadata["n"]) == self.last

    def _shown(self) -> object:
        return self.ns


def state_of(event: Event) -> int | None:
    """The task state an event carries, if any."""
    if isinstance(event, Task | TaskStatusUpdateEvent):
        return event.status.state
    return None


def task_id_of(events: list[Event]) -> str:
    """The task id of a handler stream, which starts with the Task."""
    first = events[0]
    assert isinstance(first, Task), first
    return first.id


async def background_settled(handler: Any) -> None:
    """Wait until a ``LegacyRequestHandler``'s deferred cleanups (queue closes) are done.

    The SDK keeps them in a private set (``_background_tasks``) and offers no way to wait
    for them (the legacy handler has no ``aclose``). A done task removes itself from the
    set by a callback, once the loop runs.
    """
    background = cast("set[asyncio.Task[None]]", getattr(handler, "_background_tasks", set()))
    while background:
        running = [task for task in background if not task.done()]
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        else:  # done: their callbacks remove them once the loop runs (3.12+ does not
            await asyncio.sleep(0)  # yield on a gather of done tasks: this loop would spin)


def connect(url: str, **options: Any) -> aioredis.Redis:
    """A client for a test server URL: ``redis+cluster://`` gives a ``RedisCluster``."""
    if url.startswith(tuple(f"{s}://" for s in CLUSTER_SCHEMES)):
        return cluster_client(url, **options)  # type: ignore[return-value]
    return aioredis.Redis.from_url(url, **options)


async def on_every_node(client: Any, *args: Any) -> Any:
    """Run an admin command on the server, or on every primary of a cluster."""
    if isinstance(client, RedisCluster):
        await client.initialize()  # the node list is empty until the slot map is loaded
        return await client.execute_command(*args, target_nodes=client.get_primaries())
    return await client.execute_command(*args)


async def subscriber_count(client: Any, channel: str) -> int:
    """Subscribers of a wake channel: PUBSUB NUMSUB, or SHARDNUMSUB on its cluster shard.

    The shard's count is asked of the node's own plain client: redis-py 8.2's cluster
    client parses the SHARDNUMSUB reply twice and raises, where 8.1 returned it.
    """
    if isinstance(client, RedisCluster):
        await client.initialize()
        node_redis = node_client(client.get_node_from_key(channel))
        try:
            reply = await node_redis.execute_command("PUBSUB", "SHARDNUMSUB", channel)
        finally:
            await node_redis.aclose()
    else:
        reply = await client.execute_command("PUBSUB", "NUMSUB", channel)
    return numsub_count(reply)


def numsub_count(reply: Any) -> int:
    """The subscriber count in a (SHARD)NUMSUB reply, in any shape redis-py returns it."""
    return sum(int(n) for _, n in reply_pairs(reply))


async def channels_under(client: Any, pattern: str) -> list[bytes]:
    """Channels with subscribers matching ``pattern`` (shard channels on every primary)."""
    if isinstance(client, RedisCluster):
        replies = await on_every_node(client, "PUBSUB", "SHARDCHANNELS", pattern)
        return [c for reply in replies.values() for c in reply]
    return list(await client.execute_command("PUBSUB", "CHANNELS", pattern))


async def drain_queue(queue: EventQueueLegacy, guard: float = 30) -> list[Any]:
    """Dequeue until the queue is closed (``QueueShutDown``) and empty; every event."""
    out = []
    while True:
        try:
            event = await asyncio.wait_for(queue.dequeue_event(), guard)
        except QueueShutDown:
            return out
        queue.task_done()
        out.append(event)


def numbered(
    n: int, task_id: str = "t", state: int = TaskState.TASK_STATE_WORKING
) -> TaskStatusUpdateEvent:
    """A status update carrying its sequence number ``n`` (metadata ``n``), for order checks."""
    event = TaskStatusUpdateEvent(task_id=task_id, context_id="ctx", metadata={"n": str(n)})
    event.status.state = state  # type: ignore[assignment]
    return event


def push_config_field(owner: str, config_id: str) -> bytes:
    """The hash field of one push config, as the push-config store's module docstring lays
    it out: ``encode_id(owner) + ":" + encode_id(config id)``."""
    return (encode_id(owner) + ":" + encode_id(config_id)).encode()


# -- two replicas and a running task (the reliability suites' set-up) -------------------------
@contextlib.asynccontextmanager
async def backend_pair(
    url: str, prefix: str, **options: Any
) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    """Replicas A and B: two ``RedisBackend.from_url(url, prefix=prefix, **options)``;
    closed afterwards (A first)."""
    a = RedisBackend.from_url(url, prefix=prefix, **options)
    b = RedisBackend.from_url(url, prefix=prefix, **options)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def start_task(
    store: VersionedRedisTaskStore, task_id: str = "t"
) -> tuple[Task, TaskVersion]:
    """Create ``task_id`` as WORKING (the Task is its first event); the task and its version."""
    task = make_task(task_id, state=TaskState.TASK_STATE_WORKING)
    version = await store.save(task, event=task, prev_version=TaskVersion.MISSING, context=ctx())
    return task, version


async def write_numbered(
    backend: RedisBackend, task: Task, version: TaskVersion, n: int
) -> TaskVersion:
    """Save event ``numbered(n)`` of ``task`` after ``version`` and publish it, as the SDK
    does; the new version."""
    event = numbered(n, task.id)
    version = await backend.task_store.save(task, event=event, prev_version=version, context=ctx())
    await backend.event_stream.publish(task.id, VersionedEvent(event, version))
    return version
