"""``a2a-redis push dead`` and ``push retry``, in process, against the real servers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from a2a_redis.log.keys import Keys
from a2a_redis.ops.cli import main
from tests.helpers import connect


def _letter(task: str, version: int) -> dict[bytes, bytes]:
    return {
        b"t": task.encode(), b"f": b"alice:hook", b"c": b"hook", b"o": b"alice",
        b"v": b"%d" % version, b"n": b"%032x" % version, b"e": b"HTTP 503", b"k": b"10",
    }  # fmt: skip


def _on(url: str, fn: Any) -> Any:
    async def go() -> Any:
        client = connect(url)
        try:
            return await fn(client)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_push_dead_lists_and_push_retry_requeues(
    real_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = Keys(prefix)  # the {push} streams are the same on a cluster

    async def seed(client: Any) -> None:
        for task, version in (("t1", 2), ("t1", 3), ("t2", 5)):
            await client.xadd(keys.push_dead, _letter(task, version))

    _on(real_url, seed)
    assert main(["push", "status", "--url", real_url, "--prefix", prefix]) == 0
    status = capsys.readouterr().out
    assert "0 job(s), 0 held by 0 replica(s), 3 dead letter(s)" in status
    main(["doctor", "--url", real_url, "--prefix", prefix])  # its status: the server's config
    doctor = capsys.readouterr().out
    assert "push delivery" in doctor and "3 dead letter(s)" in doctor
    assert main(["push", "dead", "--url", real_url, "--prefix", prefix]) == 0
    out = capsys.readouterr().out
    assert "3 dead letter(s)" in out and "HTTP 503" in out and "hook" in out
    assert main(["push", "dead", "--task", "t2", "--url", real_url, "--prefix", prefix]) == 0
    assert "1 dead letter(s)" in capsys.readouterr().out
    base = ["--url", real_url, "--prefix", prefix, "--json"]
    assert main(["push", "dead", "--task", "t2", *base]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["count"] == 1 and listed["dead_letters"] == [
        {
            "entry_id": listed["dead_letters"][0]["entry_id"], "task_id": "t2",
            "config_id": "hook", "version": 5, "attempts": 10, "error": "HTTP 503",
            "notification_id": f"{5:032x}",
        }
    ]  # fmt: skip
    assert main(["push", "retry", "--task", "t1", *base]) == 0
    assert json.loads(capsys.readouterr().out) == {"requeued": 2}

    async def check(client: Any) -> tuple[Any, Any]:
        return await client.xrange(keys.push_jobs), await client.xrange(keys.push_dead)

    jobs, dead = _on(real_url, check)
    assert [fields for _, fields in jobs] == [{b"t": b"t1", b"f": b"alice:hook", b"r": b"2,3"}]
    assert [fields[b"t"] for _, fields in dead] == [b"t2"]
