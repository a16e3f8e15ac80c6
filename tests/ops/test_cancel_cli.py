"""``a2a-redis tasks cancel`` goes the way of a CancelTask on a replica that does not run the
task: forwarded to the replica running it (its agent's ``cancel`` runs, its stream ends
CANCELED), else the versioned CAS write of CANCELED, which stops the agent at its owner's
next lease renewal."""

from __future__ import annotations

import asyncio
import io
import json
import sys

from a2a.server.cluster import TaskVersion
from a2a.types.a2a_pb2 import TaskState

from a2a_redis import RedisBackend
from a2a_redis.ops.cli import main
from tests.events.test_control_plane import SilentAgent, start_working
from tests.helpers import agent_card, ctx, eventually


def cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = main(argv)
    finally:
        sys.stdout, sys.stderr = saved
    return code, out.getvalue(), err.getvalue()


async def test_tasks_cancel_is_forwarded_to_the_replica_running_the_task(
    real_url: str, prefix: str
) -> None:
    backend = RedisBackend.from_url(real_url, prefix=prefix, lease_ttl=0.5)
    try:
        agent = SilentAgent()
        handler = backend.request_handler(agent, agent_card())
        task_id, runner = await start_working(handler)
        base = ["--url", real_url, "--prefix", prefix, "--owner", "alice", "--json"]
        code, out, err = await asyncio.to_thread(cli, ["tasks", "cancel", task_id, *base])
        assert code == 0, err
        result = json.loads(out)
        assert result["forwarded"] is True and result["state"] == "canceled"
        assert agent.cancels == 1  # the agent's own cancel ran, on its replica
        assert backend.control.stats()["cancels_served"] == 1
        seen = await asyncio.wait_for(runner, 30)  # its stream ended with CANCELED
        assert seen[-1].status.state == TaskState.TASK_STATE_CANCELED
        stored = await backend.task_store.get(task_id, ctx())
        assert stored is not None and stored.version == TaskVersion(result["version"])

        # --no-forward: only the CAS write; the replica stops the agent at its next renewal
        agent = SilentAgent()
        handler = backend.request_handler(agent, agent_card())
        task_id, runner = await start_working(handler)
        code, out, err = await asyncio.to_thread(
            cli, ["tasks", "cancel", task_id, "--no-forward", *base]
        )
        assert code == 0 and json.loads(out)["forwarded"] is False, err
        seen = await asyncio.wait_for(runner, 30)
        assert seen[-1].status.state == TaskState.TASK_STATE_CANCELED
        await eventually(lambda: agent.cancels == 1, what="the agent was stopped")
        code, _, err = await asyncio.to_thread(cli, ["tasks", "cancel", task_id, *base])
        assert code == 1 and "already in a terminal state" in err
    finally:
        await backend.aclose()
