"""``export``/``import`` round trips, and the operator verbs (``tasks cancel``, ``tasks delete``,
``purge``, ``stats``), through ``main([...])`` with ``--json``, on every real server."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from a2a.server.cluster import TaskVersion
from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import (
    Artifact,
    ListTasksRequest,
    Part,
    Task,
    TaskArtifactUpdateEvent,
    TaskPushNotificationConfig,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)

from a2a_redis.log.keys import Keys
from a2a_redis.ops import admin
from a2a_redis.ops.cli import main
from a2a_redis.stores.push_config_store import RedisPushNotificationConfigStore
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from tests.helpers import NamedUser, connect

T = TypeVar("T")
S = TaskState
DAY_NS = 86_400 * 1_000_000_000


def ctx(owner: str) -> ServerCallContext:
    return ServerCallContext(user=NamedUser(owner))


def run(url: str, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    async def go() -> T:
        client = connect(url)
        try:
            return await fn(client)
        finally:
            await client.aclose()

    return asyncio.run(go())


def cli(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr, sys.stdin
    sys.stdout, sys.stderr, sys.stdin = out, err, io.StringIO(stdin)
    try:
        code = main(argv)
    finally:
        sys.stdout, sys.stderr, sys.stdin = saved
    return code, out.getvalue(), err.getvalue()


async def seed(client: aioredis.Redis, prefix: str, n: int, *, age_days: float = 0) -> None:
    """``n`` tasks through the store, with events: task i is owner ("", alice, bob)[i % 3]'s,
    COMPLETED, FAILED or WORKING by (i // 3) % 3; every fifth has a push config."""
    store = VersionedRedisTaskStore(client, prefix=prefix)
    push = RedisPushNotificationConfigStore(client, prefix=prefix)
    now = time.time_ns() - int(age_days * DAY_NS)
    for i in range(n):
        owner = ("", "alice", "bob")[i % 3]
        status = TaskStatus(state=S.TASK_STATE_WORKING)
        status.timestamp.FromNanoseconds(now + i * 1000)
        task = Task(id=f"t{i:03d}", context_id=f"c{i % 2}", status=status)
        task.metadata.update({"i": i, "s": "é"})
        v = await store.save(task, event=task, prev_version=TaskVersion.MISSING, context=ctx(owner))
        art = Artifact(artifact_id="a", parts=[Part(text=f"r{i}")])
        task.artifacts.append(art)
        event: Any = TaskArtifactUpdateEvent(
            task_id=task.id, context_id=task.context_id, artifact=art
        )
        v = await store.save(task, event=event, prev_version=v, context=ctx(owner))
        final = [S.TASK_STATE_COMPLETED, S.TASK_STATE_FAILED, S.TASK_STATE_WORKING][(i // 3) % 3]
        if final != S.TASK_STATE_WORKING:
            task.status.state = final
            event = TaskStatusUpdateEvent(
                task_id=task.id, context_id=task.context_id, status=task.status
            )
            await store.save(task, event=event, prev_version=v, context=ctx(owner))
        if i % 5 == 0:
            config = TaskPushNotificationConfig(id="hook", url=f"https://h/{i}", token="tok")
            await push.set_info(task.id, config, ctx(owner))


def test_export_import_round_trip_is_identical_and_idempotent(
    real_url: str, prefix: str, tmp_path: Path
) -> None:
    run(real_url, lambda c: seed(c, prefix, 12))
    first, second = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    code, _, err = cli(
        ["export", "--url", real_url, "--prefix", prefix, "-o", str(first), "--json"]
    )
    assert code == 0 and json.loads(err) == {"exported": 12}
    lines = [json.loads(line) for line in first.read_text().splitlines()]
    assert lines[0] == {"format": 1, "kind": "a2a-redis-export"}
    assert lines[-1] == {"kind": "end", "tasks": 12}
    t5 = next(r for r in lines if r.get("id") == "t005")
    assert t5["owner"] == "bob" and t5["version"] == 3 and len(t5["events"]) == 3
    assert t5["push_configs"] == [
        {
            "owner": "bob",
            "config": {"id": "hook", "taskId": "t005", "url": "https://h/5", "token": "tok"},
        }
    ]
    copy = prefix + ":copy"
    code, out, _ = cli(["import", "--url", real_url, "--prefix", copy, "-i", str(first), "--json"])
    assert code == 0, out
    counts = json.loads(out)
    assert (counts["copied"], counts["skipped"], counts["events"], counts["push_configs"]) == (
        12, 0, 33, 3,
    )  # fmt: skip
    code, _, _ = cli(["export", "--url", real_url, "--prefix", copy, "-o", str(second)])
    assert code == 0 and second.read_bytes() == first.read_bytes()
    code, out, _ = cli(["import", "--url", real_url, "--prefix", copy, "--json"], first.read_text())
    assert code == 0 and (json.loads(out)["copied"], json.loads(out)["skipped"]) == (0, 12)
    # the imported tasks are in their owners' ListTasks
    page = run(
        real_url,
        lambda c: VersionedRedisTaskStore(c, prefix=copy).list(ListTasksRequest(), ctx("alice")),
    )
    assert page.total_size == 4 and page.tasks[0].id == "t010"
    # --owner / --state: the owner's index order, filtered
    code, out, _ = cli(
        ["export", "--url", real_url, "--prefix", prefix, "--owner", "alice", "--state", "failed"]
    )
    ids = [json.loads(line).get("id") for line in out.splitlines()[1:-1]]
    assert code == 0 and ids == ["t004"]  # alice's one FAILED task


def test_a_corrupt_or_truncated_file_names_the_line_and_writes_nothing_of_it(
    real_url: str, prefix: str, tmp_path: Path
) -> None:
    run(real_url, lambda c: seed(c, prefix, 6))
    code, text, _ = cli(["export", "--url", real_url, "--prefix", prefix])
    assert code == 0
    lines = text.splitlines(keepends=True)
    lines[2] = lines[2].replace('"task":{', '"task":{"noSuchField":7,', 1)  # t001: not a Task
    broken = "".join(lines[:-2]) + lines[-2][:40]  # t005 cut short, no end record
    copy = prefix + ":copy"
    code, out, _ = cli(["import", "--url", real_url, "--prefix", copy, "--json"], broken)
    counts = json.loads(out)
    assert code == 3 and counts["copied"] == 4 and counts["failures"] == 3
    errors = [f["error"] for f in counts["failed"]]
    assert errors[0].startswith("line 3: ParseError")
    assert errors[1].startswith("line 7: truncated")
    assert "ends without its end record" in errors[2]
    keys = Keys(copy)
    present = run(real_url, lambda c: c.exists(*(keys.task(f"t{i:03d}") for i in range(6))))
    assert present == 4
    assert run(real_url, lambda c: c.exists(keys.task("t001"), keys.events("t001"))) == 0
    code, _, err = cli(["import", "--url", real_url, "--prefix", copy], "not json\n")
    assert code == 1 and err.count("\n") == 1 and "line 1" in err


def test_import_never_overwrites_a_newer_task(real_url: str, prefix: str) -> None:
    run(real_url, lambda c: seed(c, prefix, 3))
    code, text, _ = cli(["export", "--url", real_url, "--prefix", prefix])

    async def advance(client: aioredis.Redis) -> None:
        store = VersionedRedisTaskStore(client, prefix=prefix)
        stored = await store.get("t002", ctx("bob"))
        assert stored is not None
        await store.save(stored.task, prev_version=stored.version, context=ctx("bob"))

    run(real_url, advance)
    code, out, _ = cli(["import", "--url", real_url, "--prefix", prefix, "--json"], text)
    counts = json.loads(out)
    assert code == 3 and counts["conflict_ids"] == ["t002"] and counts["skipped"] == 2


def test_tasks_cancel_delete_and_stats(real_url: str, prefix: str) -> None:
    run(real_url, lambda c: seed(c, prefix, 9))
    base = ["--url", real_url, "--prefix", prefix]
    code, out, err = cli(["tasks", "cancel", "t008", "--owner", "bob", "--json", *base])
    assert code == 0, err
    assert json.loads(out) == {"id": "t008", "state": "canceled", "version": 3, "forwarded": False}
    stored = run(
        real_url, lambda c: VersionedRedisTaskStore(c, prefix=prefix).get("t008", ctx("bob"))
    )
    assert stored is not None and stored.task.status.state == S.TASK_STATE_CANCELED
    code, _, err = cli(["tasks", "cancel", "t008", "--owner", "bob", *base])
    assert code == 1 and err == "a2a-redis: task 't008' is already in a terminal state\n"
    code, _, err = cli(["tasks", "cancel", "t008", *base])  # another owner's: not found
    assert code == 1 and "not found" in err
    code, _, err = cli(["tasks", "delete", "t008", "--owner", "bob", *base])
    assert code == 2 and "--yes" in err  # stdin is not a terminal
    code, out, _ = cli(["tasks", "delete", "t008", "--owner", "bob", "--yes", "--json", *base])
    assert code == 0 and json.loads(out) == {"id": "t008", "deleted": True}
    assert run(real_url, lambda c: c.exists(Keys(prefix).task("t008"))) == 0
    code, _, err = cli(["tasks", "delete", "t008", "--owner", "bob", "--yes", *base])
    assert code == 1 and "not found" in err
    code, out, _ = cli(["stats", "--all-owners", "--json", *base])
    stats = json.loads(out)
    assert code == 0 and stats["tasks"] == 8
    three = {"completed": 1, "failed": 1, "working": 1}
    assert stats["owners"] == [
        {"owner": "", "tasks": 3, "by_state": three},
        {"owner": "alice", "tasks": 3, "by_state": three},
        {"owner": "bob", "tasks": 2, "by_state": {"completed": 1, "failed": 1}},
    ]
    assert stats["owner_count"] == 3
    code, out, _ = cli(["stats", "--top", "1", "--json", *base])  # top N owners by tasks
    top = json.loads(out)
    assert code == 0 and (top["tasks"], top["owner_count"]) == (8, 3)
    assert top["owners"] == [{"owner": "", "tasks": 3, "by_state": three}]
    code, out, _ = cli(["stats", "--top", "1", *base])
    assert code == 0 and out.splitlines() == [
        "8 task(s), 3 owner(s)",
        "top 1 owner(s) by tasks:",
        "  owner '': 3 (1 working, 1 completed, 1 failed)",
    ]
    code, out, _ = cli(["stats", "--owner", "bob", *base])
    assert code == 0 and out.startswith("2 task(s)")
    code, out, _ = cli(["stats", "--owner", "bob", "--keys", "--json", *base])
    keys = json.loads(out)["keys"]
    assert code == 0 and keys["capped"] is False
    kinds = keys["by_kind"]
    assert (kinds["task"]["keys"], kinds["events"]["keys"], kinds["push"]["keys"]) == (8, 8, 2)
    assert kinds["lease"]["keys"] == 0 and kinds["task"]["bytes"] > 0
    assert keys["keys"] == sum(k["keys"] for k in kinds.values())


def test_purge_removes_only_what_matches_and_list_totals_stay_right(
    real_url: str, prefix: str
) -> None:
    run(real_url, lambda c: seed(c, prefix, 30, age_days=40))
    base = ["--url", real_url, "--prefix", prefix]

    async def recent(client: aioredis.Redis) -> None:  # alice: 2 recent completed tasks
        store = VersionedRedisTaskStore(client, prefix=prefix)
        for j in range(2):
            task = Task(
                id=f"new{j}", context_id="c0", status=TaskStatus(state=S.TASK_STATE_COMPLETED)
            )
            task.status.timestamp.GetCurrentTime()
            await store.save(task, prev_version=TaskVersion.MISSING, context=ctx("alice"))

    run(real_url, recent)
    argv = ["purge", "--owner", "alice", "--older-than", "30d", "--json", *base]
    code, out, _ = cli([*argv, "--dry-run", "--batch", "3"])
    dry = json.loads(out)
    assert code == 0 and dry["total"] == 7 and dry["owners"]["alice"]["completed"] == 4
    code, out, _ = cli([*argv, "--state", "failed,completed", "--batch", "3"])
    assert code == 0 and json.loads(out)["owners"] == {"alice": {"failed": 3, "completed": 4}}

    async def totals(client: aioredis.Redis) -> dict[str, int]:
        store = VersionedRedisTaskStore(client, prefix=prefix)
        out = {}
        for owner in ("", "alice", "bob"):
            page = await store.list(ListTasksRequest(), ctx(owner))
            out[owner] = page.total_size
            assert len(page.tasks) == page.total_size
        failed = await store.list(ListTasksRequest(status=S.TASK_STATE_FAILED), ctx("alice"))
        out["alice failed"] = failed.total_size
        return out

    assert run(real_url, totals) == {"": 10, "alice": 5, "bob": 10, "alice failed": 0}
    code, out, _ = cli(["purge", "--all-owners", "--older-than", "30d", "--json", *base])
    assert code == 0 and json.loads(out)["total"] == 14  # "" and bob: 4 completed, 3 failed
    with pytest.raises(SystemExit) as usage:  # argparse: exit status 2, its message on stderr
        cli(["purge", "--older-than", "soon", *base])
    assert usage.value.code == 2


def test_doctor_tasks_and_tail_print_json(real_url: str, prefix: str) -> None:
    run(real_url, lambda c: seed(c, prefix, 4))
    base = ["--url", real_url, "--prefix", prefix]
    code, out, _ = cli(["doctor", "--json", *base])
    report = json.loads(out)
    assert code in (0, 3) and report["healthy"] == (code == 0)
    assert report["report"][0].startswith("url") and isinstance(report["problems"], list)
    code, out, _ = cli(["tasks", "--owner", "alice", "--page-size", "1", "--json", *base])
    page = json.loads(out)
    assert code == 0 and page["total_size"] == 1 and page["next_page_token"] is None
    assert page["tasks"] == [
        {
            "id": "t001",
            "state": "completed",
            "updated": page["tasks"][0]["updated"],
            "context_id": "c1",
        }
    ]
    code, out, _ = cli(
        [
            "tail",
            "t001",
            "--owner",
            "alice",
            "--from-version",
            "1",
            "--until-final",
            "--json",
            *base,
        ]
    )
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [(e["version"], e["kind"]) for e in events] == [
        (1, "task"), (2, "artifact-update"), (3, "status-update"),
    ]  # fmt: skip
    assert events[2]["detail"] == "COMPLETED" and "r1" not in out  # never artifact text
    code, out, _ = cli(["tail", "t001", "--owner", "alice", "--until-final", "--json", *base])
    assert code == 0 and json.loads(out) == {
        "id": "t001", "state": "completed", "version": 3, "final": True,
    }  # fmt: skip


def test_an_interrupted_command_exits_130_in_one_line(
    real_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # Ctrl-C in the middle of the work

    monkeypatch.setattr(admin, "purge", interrupted)
    argv = ["purge", "--url", real_url, "--prefix", prefix, "--older-than", "1d", "--json"]
    assert cli(argv) == (130, "", "interrupted\n")
