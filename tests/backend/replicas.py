"""Two SDK request handlers in one process ("replicas" A and B) on one prefix, and agents
whose pace the test sets: what the handler suites (cluster mode and legacy) share.

Each replica has its own client, ``VersionedRedisTaskStore`` and agent executor instance,
as separate processes would; each suite adds its handler and event plumbing. Every task
follows a :class:`Script`, keyed by its message's text: the agent awaits one release of
the script's gate before each step, so "after the first events" is a state, not a sleep.
Timeouts are hang guards only, never asserted bounds.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from a2a.helpers.proto_helpers import get_message_text
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event
from a2a.types.a2a_pb2 import GetTaskRequest, SubscribeToTaskRequest, Task

from a2a_redis.stores.task_store import VersionedRedisTaskStore
from tests.helpers import Tap, connect, ctx, send_request

GUARD = 30.0  # seconds: a hang guard only, never an asserted bound


@dataclass
class Script:
    """What the agent does for one task, and the test's handle on it.

    ``steps`` chunks, then the ``end`` (the agents say what each end is). When ``paced``,
    the agent awaits one release of ``gate`` before each chunk and one before the end:
    ``steps + 1`` releases in all.
    """

    steps: int = 3
    end: str = "complete"
    paced: bool = True
    gate: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    runs: list[str] = field(default_factory=list)  # replicas whose execute() ran, in order
    task_ids: asyncio.Queue[str] = field(default_factory=asyncio.Queue)  # of each run
    cancel_calls: list[str] = field(default_factory=list)  # replicas whose cancel() ran
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.put_nowait(None)

    def unblock(self) -> None:
        """Let the agent run to its end unpaced (teardown after a failure)."""
        self.paced = False
        self.release(self.steps + 1)

    async def step(self) -> None:
        if self.paced:
            await self.gate.get()


class Scripts(dict[str, Script]):
    """The test's scripts, by message text."""

    def new(self, **kwargs: Any) -> tuple[str, Script]:
        """A new script and the message text that runs it."""
        key = f"job-{uuid.uuid4().hex[:10]}"
        self[key] = Script(**kwargs)
        return key, self[key]


class ScriptedExecutor(AgentExecutor):
    """An agent of one replica; the scripts (keyed by message text) are the test's."""

    def __init__(self, name: str, scripts: Scripts) -> None:
        self.name = name
        self.scripts = scripts

    def begin(self, context: RequestContext) -> Script:
        """The script of the message this run answers; records the run and its task id."""
        assert context.message is not None
        script = self.scripts[get_message_text(context.message)]
        script.runs.append(self.name)
        script.task_ids.put_nowait(str(context.task_id))
        return script

    def script_of_task(self, task: Task) -> Script:
        """The script of the message that started ``task``."""
        return self.scripts[get_message_text(task.history[0])]


class HandlerReplica:
    """One replica: its client and store; a suite's subclass sets ``handler``.

    ``tap_type``: what drives the handler's streams (a :class:`~tests.helpers.Tap`).
    """

    tap_type: type[Tap] = Tap
    handler: Any  # the SDK's request handler (DefaultRequestHandler, LegacyRequestHandler)

    def __init__(self, name: str, url: str, prefix: str) -> None:
        self.name = name
        self.client = connect(url)
        self.store = VersionedRedisTaskStore(self.client, prefix=prefix)
        self.taps: list[Tap] = []

    def send_stream(self, key: str, *, context_id: str = "", task_id: str = "") -> Tap:
        """A streaming send of the message ``key`` (a script's key)."""
        request = send_request(key, context_id=context_id, task_id=task_id)
        return self.follow(self.handler.on_message_send_stream(request, ctx()))

    def subscribe(self, task_id: str) -> Tap:
        request = SubscribeToTaskRequest(id=task_id)
        return self.follow(self.handler.on_subscribe_to_task(request, ctx()))

    def follow(self, events: AsyncGenerator[Event, None]) -> Tap:
        """Drive a handler stream (closed with the replica)."""
        tap = self.tap_type(events)
        self.taps.append(tap)
        return tap

    async def get(self, task_id: str, context: ServerCallContext | None = None) -> Task:
        request = GetTaskRequest(id=task_id)
        task = await asyncio.wait_for(self.handler.on_get_task(request, context or ctx()), GUARD)
        assert task is not None
        return task

    async def close(self) -> None:
        """Stop following the streams; a subclass then closes what it made."""
        for tap in self.taps:
            await tap.close()


R = TypeVar("R", bound=HandlerReplica)


@dataclass
class Pair(Generic[R]):
    """Replicas A and B, and the scripts their agents follow."""

    a: R
    b: R
    scripts: Scripts

    def script(self, **kwargs: Any) -> tuple[str, Script]:
        """A new script and the message text that runs it."""
        return self.scripts.new(**kwargs)


P = TypeVar("P", bound=Pair[Any])


@asynccontextmanager
async def in_process_pair(
    replica_type: Callable[[str, str, str, Scripts], R],
    url: str,
    prefix: str,
    pair_type: Callable[[R, R, Scripts], P],
) -> AsyncIterator[P]:
    """Replicas "A" and "B" (``replica_type(name, url, prefix, scripts)``); closed
    afterwards, once every agent still waiting at its gate (after a failure) is let go."""
    scripts = Scripts()
    a = replica_type("A", url, prefix, scripts)
    b = replica_type("B", url, prefix, scripts)
    try:
        yield pair_type(a, b, scripts)
    finally:
        for script in scripts.values():
            script.unblock()
        await a.close()
        await b.close()
