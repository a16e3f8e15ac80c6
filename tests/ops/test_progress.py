"""Progress of long work (``migrate``, ``import``, ``purge``): a ``rich`` bar on a terminal
(the ``cli`` extra), plain lines when the output is not a terminal or rich is missing; always
on stderr, so that stdout keeps only the result (``--json``)."""

from __future__ import annotations

import asyncio
import io
import json
import sys

import pytest
from a2a.server.cluster import TaskVersion
from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import Task, TaskState, TaskStatus

from a2a_redis.ops.cli import main
from a2a_redis.ops.migrate import Progress
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from tests.helpers import connect


class Tty(io.StringIO):
    """A terminal, as far as ``isatty`` tells."""

    def isatty(self) -> bool:
        return True


def test_plain_lines_when_the_output_is_not_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(25, out=out, every=10)
    for _ in range(5):
        progress.advance(5)
    progress.close()
    assert progress._bar is None
    lines = out.getvalue().splitlines()
    assert [line.split(" ")[0] for line in lines] == ["10/25", "20/25"]
    assert all(line.endswith("/s)") for line in lines)
    unknown = io.StringIO()  # import and purge: the total is not known
    Progress(0, out=unknown, every=2).advance(3)
    assert unknown.getvalue().startswith("2 tasks (")


def test_plain_lines_on_a_terminal_when_rich_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich.progress", None)  # the cli extra is not installed
    tty = Tty()
    progress = Progress(3, out=tty, every=2)
    progress.advance(3)
    progress.close()
    assert progress._bar is None and tty.getvalue() == tty.getvalue().lstrip()
    assert tty.getvalue().startswith("2/3 tasks (")


def test_a_rich_bar_on_a_terminal_and_nothing_on_stdout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tty = Tty()
    progress = Progress(40, out=tty, every=10)
    assert progress._bar is not None
    for _ in range(4):
        progress.advance(10)
    assert progress._bar.tasks[0].completed == 40 and progress._bar.tasks[0].total == 40
    progress.close()
    drawn = tty.getvalue()
    assert "\x1b[" in drawn  # the bar, drawn with terminal controls (then erased: transient)
    assert "10/40 tasks" not in drawn  # not the plain lines
    assert capsys.readouterr().out == ""


def test_purge_json_on_stdout_while_the_bar_draws_on_a_terminal_stderr(
    real_url: str, prefix: str
) -> None:
    async def seed() -> None:
        client = connect(real_url)
        try:
            store = VersionedRedisTaskStore(client, prefix=prefix)
            for i in range(5):
                task = Task(id=f"p{i}", status=TaskStatus(state=TaskState.TASK_STATE_COMPLETED))
                task.status.timestamp.FromSeconds(1_000_000_000 + i)
                await store.save(
                    task, prev_version=TaskVersion.MISSING, context=ServerCallContext()
                )
        finally:
            await client.aclose()

    asyncio.run(seed())
    out, err = io.StringIO(), Tty()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        argv = ["purge", "--url", real_url, "--prefix", prefix, "--older-than", "1d", "--json"]
        code = main(argv)
    finally:
        sys.stdout, sys.stderr = saved
    assert code == 0 and json.loads(out.getvalue())["total"] == 5  # stdout: the JSON alone
    assert "\x1b[" in err.getvalue()
