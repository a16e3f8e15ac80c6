"""Helpers shared by the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
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

    def wait_ready(self, guard: float = 30) -> None:
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

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
