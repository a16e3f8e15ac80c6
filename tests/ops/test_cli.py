"""The ``a2a-redis`` command line, run in process (``main([...])``) against real servers.

``main`` is synchronous and calls ``asyncio.run``, so these tests are plain ``def`` tests, and
they seed data through :func:`_run`, which runs its own event loop with its own client.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis
from a2a.server.cluster import TaskVersion
from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import (
    Artifact,
    Part,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)

import a2a_redis
from a2a_redis.log.keys import Keys
from a2a_redis.ops import doctor
from a2a_redis.ops.cli import main
from a2a_redis.ops.embedded import EmbeddedServer
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from tests.helpers import connect, make_task, subscriber_count

T = TypeVar("T")
SECRET_TEXT = "the-secret-artifact-text"
NO_CTX = ServerCallContext()


def _run(url: str, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """Run ``fn(client)`` in a fresh event loop with a client of ``url`` (closed after)."""

    async def go() -> T:
        client = connect(url)
        try:
            return await fn(client)
        finally:
            await client.aclose()

    return asyncio.run(go())


def _store(client: aioredis.Redis, prefix: str, owner: str = "") -> VersionedRedisTaskStore:
    return VersionedRedisTaskStore(client, prefix=prefix, owner_resolver=lambda _c: owner)


@pytest.fixture
def url(real_url: str, prefix: str) -> Iterator[str]:
    """A real server's URL; the test's prefix is deleted afterwards (SCAN + UNLINK)."""
    yield real_url

    async def cleanup(client: aioredis.Redis) -> None:
        async for key in client.scan_iter(match=Keys(prefix).scan_pattern(), count=500):
            await client.unlink(key)

    _run(real_url, cleanup)


def _copy(task: Task) -> Task:
    copy = Task()
    copy.CopyFrom(task)
    return copy


def _status(task_id: str, state: int) -> TaskStatusUpdateEvent:
    return TaskStatusUpdateEvent(task_id=task_id, context_id="ctx", status=TaskStatus(state=state))


def _seed_lifecycle(url: str, prefix: str, task_id: str, owner: str = "") -> None:
    """A task written four times, each write with its event: versions 1-4, ending COMPLETED."""

    async def seed(client: aioredis.Redis) -> None:
        store = _store(client, prefix, owner)
        task = make_task(task_id, state=TaskState.TASK_STATE_SUBMITTED, ts_ns=1_000)
        v = await store.save(
            task, event=_copy(task), prev_version=TaskVersion.MISSING, context=NO_CTX
        )
        task.status.state = TaskState.TASK_STATE_WORKING
        v = await store.save(
            task, event=_status(task_id, task.status.state), prev_version=v, context=NO_CTX
        )
        artifact = Artifact(artifact_id="art-1", name="out", parts=[Part(text=SECRET_TEXT)])
        task.artifacts.append(artifact)
        event = TaskArtifactUpdateEvent(
            task_id=task_id, context_id="ctx", artifact=artifact, last_chunk=True
        )
        v = await store.save(task, event=event, prev_version=v, context=NO_CTX)
        task.status.state = TaskState.TASK_STATE_COMPLETED
        await store.save(
            task, event=_status(task_id, task.status.state), prev_version=v, context=NO_CTX
        )

    _run(url, seed)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _assert_one_line_error(rc: int, out: str, err: str, *fragments: str) -> None:
    assert rc == 1
    assert "Traceback" not in out + err
    lines = _lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("a2a-redis: ")
    for fragment in fragments:
        assert fragment in lines[0]


# -- doctor --------------------------------------------------------------------------------
def test_doctor_reports_server_and_our_keys(
    url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed_lifecycle(url, prefix, "t-1")
    assert main(["doctor", "--url", url, "--prefix", prefix]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^server +(Redis|Valkey) \d+\.\d+", out, re.M)
    if url.startswith("redis+cluster"):
        assert re.search(r"^topology +Redis Cluster: 3 primaries, 0 replicas, state ok$", out, re.M)
        assert re.search(r"^slots +16384 of 16384 covered$", out, re.M)
        assert re.search(r"^mode +cluster node, role master", out, re.M)
    else:
        assert re.search(r"^mode +standalone, role master", out, re.M)
    library = f"a2a-redis {a2a_redis.__version__}, redis-py {redis.__version__}"
    assert re.search(rf"^library +{re.escape(library)}$", out, re.M)
    assert re.search(r"^round trip +\d+\.\d+ ms \(median of 5 PINGs\)", out, re.M)
    assert re.search(r"^eviction +maxmemory-policy noeviction$", out, re.M)
    assert re.search(r"^persistence +AOF (on|off); RDB ", out, re.M)
    assert re.search(rf"^our keys +\d+ under '{re.escape(prefix)}:', \d", out, re.M)
    assert re.search(r"^  task +1 +\d", out, re.M)
    assert re.search(r"^  events +1 +\d", out, re.M)
    assert re.search(r"^  index +[1-9]", out, re.M)
    assert "WARNING" not in out
    assert out.rstrip().endswith("healthy: no problem found")


def test_doctor_caps_the_key_scan(
    url: str, prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed_lifecycle(url, prefix, "t-1")
    _seed_lifecycle(url, prefix, "t-2")
    monkeypatch.setattr(doctor, "KEY_SCAN_CAP", 3)
    assert main(["doctor", "--url", url, "--prefix", prefix]) == 0
    out = capsys.readouterr().out
    assert "the first 3 (counting stops there; more may exist)" in out


def test_doctor_warns_loudly_about_eviction(capsys: pytest.CaptureFixture[str]) -> None:
    with EmbeddedServer(extra_args=("--maxmemory-policy", "allkeys-lru")) as server:
        rc = main(["doctor", "--url", server.url])
    out = capsys.readouterr().out
    assert rc == 3
    assert re.search(r"^eviction +maxmemory-policy allkeys-lru$", out, re.M)
    assert "!!! WARNING: maxmemory-policy is 'allkeys-lru', not 'noeviction'" in out
    assert "SILENTLY DELETES KEYS" in out
    assert out.rstrip().endswith("1 problem(s) found")


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    assert a2a_redis.__version__ == importlib.metadata.version("a2a-redis")
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"a2a-redis {a2a_redis.__version__}\n"


def test_doctor_help_documents_the_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Exit status 0 when healthy, 3 when a problem was found" in out
    assert "3 doctor found a problem: a maxmemory-policy other than noeviction" in out


# -- tasks ---------------------------------------------------------------------------------
def _seed_tasks(url: str, prefix: str) -> None:
    async def seed(client: aioredis.Redis) -> None:
        alice = _store(client, prefix, "alice")
        working = TaskState.TASK_STATE_WORKING
        for i, (ctx_id, state) in enumerate(
            [("c1", working), ("c2", TaskState.TASK_STATE_COMPLETED), ("c1", working)]
        ):
            task = make_task(f"a-{i}", context_id=ctx_id, state=state, ts_ns=(i + 1) * 10**18)
            await alice.save(task, prev_version=TaskVersion.MISSING, context=NO_CTX)
        await _store(client, prefix, "bob").save(
            make_task("b-0"), prev_version=TaskVersion.MISSING, context=NO_CTX
        )

    _run(url, seed)


def _listed_ids(out: str) -> list[str]:
    return [line.split()[0] for line in _lines(out) if re.match(r"^[ab]-\d ", line)]


def test_tasks_lists_an_owners_tasks_newest_first(
    url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed_tasks(url, prefix)
    base = ["tasks", "--url", url, "--prefix", prefix, "--owner", "alice"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert _listed_ids(out) == ["a-2", "a-1", "a-0"]
    assert re.search(r"^a-0 +WORKING +2001-09-09T01:46:40Z +c1$", out, re.M)
    assert "3 shown, 3 in total for owner 'alice'" in out

    assert main([*base, "--status", "working"]) == 0
    assert _listed_ids(capsys.readouterr().out) == ["a-2", "a-0"]
    assert main([*base, "--context", "c2"]) == 0
    assert _listed_ids(capsys.readouterr().out) == ["a-1"]

    assert main([*base, "--page-size", "2"]) == 0
    out = capsys.readouterr().out
    assert _listed_ids(out) == ["a-2", "a-1"]
    token = re.search(r"^next page: --page-token (\S+)$", out, re.M)
    assert token is not None
    assert main([*base, "--page-size", "2", "--page-token", token.group(1)]) == 0
    assert _listed_ids(capsys.readouterr().out) == ["a-0"]

    # The default owner is the unauthenticated user (""), who owns none of these.
    assert main(["tasks", "--url", url, "--prefix", prefix]) == 0
    assert "0 shown, 0 in total for owner ''" in capsys.readouterr().out


def test_options_before_the_command_and_redis_url_from_the_environment(
    url: str, prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed_tasks(url, prefix)
    monkeypatch.setenv("REDIS_URL", url)
    assert main(["--prefix", prefix, "tasks", "--owner", "bob"]) == 0
    assert _listed_ids(capsys.readouterr().out) == ["b-0"]


def test_tasks_get_shows_one_task_without_its_text(
    url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed_lifecycle(url, prefix, "t-1", owner="alice")
    base = ["tasks", "get", "t-1", "--url", url, "--prefix", prefix, "--owner", "alice"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert re.search(r"^version +4$", out, re.M)
    assert re.search(r"^state +COMPLETED$", out, re.M)
    assert re.search(r"^context +ctx$", out, re.M)
    assert re.search(r"^history +0 message\(s\)$", out, re.M)
    assert re.search(r"^artifacts +1$", out, re.M)
    assert re.search(r"^  art-1 'out': 1 part\(s\), \d+ B$", out, re.M)
    assert re.search(r"^metadata +-$", out, re.M)
    assert SECRET_TEXT not in out

    assert main([*base, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == 4
    assert doc["task"]["id"] == "t-1"
    assert doc["task"]["status"]["state"] == "TASK_STATE_COMPLETED"


def test_tasks_get_of_a_missing_task_fails(
    url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed_lifecycle(url, prefix, "t-1", owner="alice")
    for argv in (["tasks", "get", "nope"], ["tasks", "get", "t-1", "--owner", "mallory"]):
        rc = main([*argv, "--url", url, "--prefix", prefix])
        out, err = capsys.readouterr()
        _assert_one_line_error(rc, out, err, "not found")
        assert out == ""


def test_invalid_page_token_fails(
    url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["tasks", "--url", url, "--prefix", prefix, "--page-token", "garbage"])
    out, err = capsys.readouterr()
    _assert_one_line_error(rc, out, err, "cursor")


def test_unknown_state_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["tasks", "--status", "bogus"])
    assert exit_info.value.code == 2
    assert "unknown state 'bogus'" in capsys.readouterr().err


# -- tail ----------------------------------------------------------------------------------
def _event_lines(out: str) -> list[str]:
    return [line for line in _lines(out) if line.startswith("v")]


def test_tail_replays_from_a_version_until_final(
    url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed_lifecycle(url, prefix, "t-1")
    base = ["tail", "t-1", "--url", url, "--prefix", prefix, "--until-final"]
    assert main([*base, "--from-version", "1"]) == 0
    out, err = capsys.readouterr()
    lines = _event_lines(out)
    assert [line.split()[:3] for line in lines] == [
        ["v1", "task", "SUBMITTED,"],
        ["v2", "status-update", "WORKING"],
        ["v3", "artifact-update", "artifact"],
        ["v4", "status-update", "COMPLETED"],
    ]
    assert re.search(r"artifact art-1: 1 part\(s\), \d+ B last-chunk$", lines[2])
    assert SECRET_TEXT not in out
    assert "following from version 1" in err

    assert main([*base, "--from-version", "3"]) == 0
    assert [line.split()[0] for line in _event_lines(capsys.readouterr().out)] == ["v3", "v4"]

    # Without --from-version, a task that is already final has nothing more to show.
    assert main(base) == 0
    assert "already final (COMPLETED) at version 4" in capsys.readouterr().out


def test_tail_follows_live_events(
    url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def start(client: aioredis.Redis) -> None:
        task = make_task("live", state=TaskState.TASK_STATE_WORKING)
        await _store(client, prefix).save(
            task, event=_copy(task), prev_version=TaskVersion.MISSING, context=NO_CTX
        )

    _run(url, start)
    errors: list[BaseException] = []

    async def write_when_followed(client: aioredis.Redis) -> None:
        channel = Keys(prefix).wake("live")
        deadline = time.monotonic() + 60
        while not await subscriber_count(client, channel):
            if time.monotonic() > deadline:
                raise RuntimeError("tail never subscribed")
            await asyncio.sleep(0.02)
        store = _store(client, prefix)
        task = make_task("live", state=TaskState.TASK_STATE_INPUT_REQUIRED)
        v = await store.save(
            task, event=_status("live", task.status.state), prev_version=TaskVersion(1),
            context=NO_CTX,
        )  # fmt: skip
        task.status.state = TaskState.TASK_STATE_FAILED
        await store.save(
            task, event=_status("live", task.status.state), prev_version=v, context=NO_CTX
        )

    def writer() -> None:
        try:
            _run(url, write_when_followed)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        rc = main(["tail", "live", "--url", url, "--prefix", prefix, "--until-final"])
    finally:
        thread.join()
    assert not errors
    assert rc == 0
    out, err = capsys.readouterr()
    assert [line.split()[:3] for line in _event_lines(out)] == [
        ["v2", "status-update", "INPUT_REQUIRED"],
        ["v3", "status-update", "FAILED"],
    ]
    assert "WORKING at version 1; following new events" in err


def test_tail_of_a_missing_task_fails(
    url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["tail", "nope", "--url", url, "--prefix", prefix])
    out, err = capsys.readouterr()
    _assert_one_line_error(rc, out, err, "task 'nope' not found")


# -- connection errors ---------------------------------------------------------------------
COMMANDS = [
    ["doctor"], ["tasks"], ["tasks", "get", "x"], ["tail", "x"],
    ["tasks", "cancel", "x"], ["tasks", "delete", "x", "--yes"], ["stats"],
    ["purge", "--older-than", "30d"], ["export"], ["import"], ["push", "dead"],
    ["migrate", "--from", "sqlite+aiosqlite:///never-opened.db"],
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_bad_url(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([*command, "--url", "nope://x"])
    out, err = capsys.readouterr()
    _assert_one_line_error(rc, out, err, "scheme")


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_unreachable_server(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([*command, "--url", "redis://127.0.0.1:1"])
    out, err = capsys.readouterr()
    _assert_one_line_error(rc, out, err, "cannot reach Redis at redis://127.0.0.1:1")


def test_bad_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["tasks", "--prefix", "a{b}"])
    out, err = capsys.readouterr()
    _assert_one_line_error(rc, out, err, "invalid key prefix")


@pytest.fixture(scope="module")
def password_server() -> Iterator[EmbeddedServer]:
    """A private server that requires the password ``s3cret``.

    The password is set after start: ``EmbeddedServer.start`` waits for a ``+PONG`` that a
    server started with ``--requirepass`` never sends to an unauthenticated PING.
    """

    async def set_password(client: aioredis.Redis) -> None:
        await client.config_set("requirepass", "s3cret")

    with EmbeddedServer() as server:
        _run(server.url, set_password)
        yield server


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_password_required(
    password_server: EmbeddedServer, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main([*command, "--url", password_server.url])
    out, err = capsys.readouterr()
    _assert_one_line_error(rc, out, err, "the server requires a password")


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_wrong_password(
    password_server: EmbeddedServer, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = password_server.url.replace("redis://", "redis://:wrong@")
    rc = main([*command, "--url", wrong])
    out, err = capsys.readouterr()
    _assert_one_line_error(rc, out, err, "authentication failed", "redis://:***@127.0.0.1")
    assert "wrong" not in err.replace("authentication failed", "")


def test_right_password_is_masked_in_output(
    password_server: EmbeddedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    right = password_server.url.replace("redis://", "redis://:s3cret@")
    assert main(["doctor", "--url", right]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert re.search(r"^url +redis://:\*\*\*@127\.0\.0\.1:\d+$", out, re.M)


# -- demo ----------------------------------------------------------------------------------
def test_demo_runs_the_two_replica_demo() -> None:
    script = Path(sys.executable).with_name("a2a-redis")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "a2a_redis.ops.cli"]
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    result = subprocess.run(
        [*argv, "demo"], capture_output=True, text=True, timeout=110, env=env, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "embedded Redis-compatible server" in out
    assert "replica 1 at http://127.0.0.1:" in out
    assert "[replica 1] send stream" in out
    assert "[replica 2] resubscribe" in out
    assert "[replica 2] CancelTask" in out
    assert "[replica 2] cancel        -> CANCELED" in out
    assert "[replica 2] ListTasks     ->" in out
    assert "stopped both replicas" in out


def test_doctor_lists_the_replicas_and_flags_one_dead_with_tasks(
    url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = Keys(prefix)

    async def seed() -> None:
        client = connect(url)
        try:
            await client.zadd(keys.replicas, {"aa11": 2**52, "bb22": 1})  # live; dead long ago
            await client.sadd(keys.replica_tasks("aa11"), "t-1", "t-2")
            await client.sadd(keys.replica_tasks("bb22"), "t-3")
        finally:
            await client.aclose()

    asyncio.run(seed())
    assert main(["doctor", "--url", url, "--prefix", prefix]) == 3
    out = capsys.readouterr().out
    assert re.search(r"^replicas +1 running tasks now: aa11$", out, re.M)
    assert re.search(r"^  aa11 +2 tasks  heartbeat due in", out, re.M)
    assert re.search(r"^  bb22 +1 tasks  heartbeat missed", out, re.M)
    assert "!!! WARNING: replica bb22 missed its heartbeat" in out
    assert "orphan_policy='fail'" in out
