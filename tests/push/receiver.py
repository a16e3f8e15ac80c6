"""A real webhook receiver on loopback (Starlette under uvicorn, in process) for push tests.

Each path is one receiver (``/x``, ``/y`` ...). The test tells a path to fail the first N
attempts of every notification (``fail_first``), to answer 503 to everything (``down``), or
to hold every request until released (``stall``). Every request is recorded, answered or
not, with its headers and JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from a2a.types.a2a_pb2 import StreamResponse
from google.protobuf.json_format import ParseDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.helpers import free_port


@dataclass
class Hit:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int

    @property
    def nid(self) -> str:
        return self.headers["x-a2a-notification-id"]

    def event(self) -> StreamResponse:
        return ParseDict(self.body, StreamResponse())


@dataclass
class Path:
    """What one path does."""

    fail_first: int = 0
    down: bool = False
    fail_status: int = 503
    retry_after: str | None = None
    stall: asyncio.Event | None = None
    attempts: Counter[str] = field(default_factory=Counter)


class Receiver:
    """The receiver: ``url(path)``, ``hits``, ``delivered(path)``, and each path's behaviour."""

    def __init__(self) -> None:
        self.port = free_port()
        self.paths: dict[str, Path] = {}
        self.hits: list[Hit] = []
        self.app = Starlette(routes=[Route("/{name}", self._handle, methods=["POST"])])

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def path(self, name: str) -> Path:
        return self.paths.setdefault(name, Path())

    def delivered(self, name: str) -> list[Hit]:
        """The 2xx-answered requests to ``/name``, in arrival order."""
        return [h for h in self.hits if h.path == name and h.status == 200]

    async def _handle(self, request: Request) -> Response:
        name = request.path_params["name"]
        behaviour = self.path(name)
        body = await request.json()
        headers = {k.lower(): v for k, v in request.headers.items()}
        nid = headers.get("x-a2a-notification-id", "")
        behaviour.attempts[nid] += 1
        if behaviour.stall is not None:
            await behaviour.stall.wait()
        failing = behaviour.down or behaviour.attempts[nid] <= behaviour.fail_first
        status = behaviour.fail_status if failing else 200
        self.hits.append(Hit(name, headers, body, status))
        extra = {"Retry-After": behaviour.retry_after} if failing and behaviour.retry_after else {}
        return Response(status_code=status, headers=extra)


@contextlib.asynccontextmanager
async def running_receiver() -> AsyncIterator[Receiver]:
    """A :class:`Receiver` served on a free loopback port for the duration of the block."""
    receiver = Receiver()
    config = uvicorn.Config(
        receiver.app, host="127.0.0.1", port=receiver.port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    try:
        for _ in range(2000):  # hang guard: 20 s
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "the receiver did not start"
        yield receiver
    finally:
        for p in receiver.paths.values():
            if p.stall is not None:
                p.stall.set()
        server.should_exit = True
        await asyncio.wait_for(task, 30)
