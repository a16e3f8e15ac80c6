"""The ``a2a-redis`` command line: doctor, tasks (get/cancel/delete), tail, migrate, demo...

Also ``export``, ``import``, ``purge`` and ``stats`` (``cli_ops.py``).

Every command takes ``--url`` (default ``$REDIS_URL``, else ``redis://127.0.0.1:6379/0``) and
``--prefix`` (default ``a2a``), before or after the command name. Task commands see what the
store shows one owner (``--owner``, default ``""``: the unauthenticated user).

Exit status: 0 success; 1 error (Redis unreachable, wrong password, task not found, ...),
with one line on stderr; 2 usage error; 3 ``doctor`` found a problem (``migrate``, ``import``:
conflicts or failures); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from a2a.server.cluster import TaskVersion
from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event
from a2a.types.a2a_pb2 import (
    ListTasksRequest,
    Message,
    Role,
    Task,
    TaskArtifactUpdateEvent,
    TaskStatusUpdateEvent,
)
from a2a.utils.errors import A2AError
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from redis import exceptions as rex

from a2a_redis.connection.cluster import Client
from a2a_redis.errors import A2ARedisError
from a2a_redis.events.event_stream import RedisTaskEventStream
from a2a_redis.log.codec import TERMINAL_STATES, version_int
from a2a_redis.log.keys import Keys
from a2a_redis.ops import cli_migrate, cli_ops, doctor, push_cli
from a2a_redis.ops.cli_common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PROBLEM,
)
from a2a_redis.ops.cli_common import Fail as _Fail
from a2a_redis.ops.cli_common import connect as _connect
from a2a_redis.ops.cli_common import describe_error as _describe_error
from a2a_redis.ops.cli_common import int_at_least as _int_at_least
from a2a_redis.ops.cli_common import parse_state as _parse_state
from a2a_redis.ops.cli_common import redact as _redact
from a2a_redis.ops.cli_common import state_name as _state_name
from a2a_redis.ops.report import Report
from a2a_redis.ops.report import size as format_size
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from a2a_redis.version import __version__

__all__ = ["main"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "a2a"

_EPILOG = """\
exit status:
  0    success (doctor: no problem found)
  1    error: bad URL, Redis unreachable, wrong password, task not found, ...
  2    usage error
  3    doctor found a problem: a maxmemory-policy other than noeviction, a read-only
       replica, a Sentinel instead of a data server, a server older than 6.2, memory
       use near maxmemory, or failing persistence; with redis+sentinel://, also a
       Sentinel down, fewer than 3 Sentinels, no replica or one not replicating, and
       a master or replica without persistence
       (migrate, import: conflicts or failures, listed with their ids)
  130  interrupted (Ctrl-C)
"""


# -- helpers -------------------------------------------------------------------------------
def _timestamp(ts: Timestamp, present: bool) -> str:
    return ts.ToJsonString() if present else "-"


def _store(client: Client, args: argparse.Namespace) -> VersionedRedisTaskStore:
    owner: str = args.owner
    return VersionedRedisTaskStore(client, prefix=args.prefix, owner_resolver=lambda _c: owner)


async def _doctor(args: argparse.Namespace) -> int:
    report = Report()
    printed = io.StringIO()
    async with _connect(args.url) as client:
        with contextlib.redirect_stdout(printed) if args.json else contextlib.nullcontext():
            report.line("url", _redact(args.url))
            await doctor.check(client, Keys(args.prefix), report)
    if args.json:  # the report's lines as printed, and the problems found
        lines = printed.getvalue().splitlines()
        body = {"healthy": not report.problems, "problems": report.problems, "report": lines}
        print(json.dumps(body, sort_keys=True))
        return EXIT_PROBLEM if report.problems else EXIT_OK
    if report.problems:
        print(f"{len(report.problems)} problem(s) found")
        return EXIT_PROBLEM
    print("healthy: no problem found")
    return EXIT_OK


# -- tasks ---------------------------------------------------------------------------------
async def _tasks(args: argparse.Namespace) -> int:
    request = ListTasksRequest(page_size=args.page_size)
    if args.context:
        request.context_id = args.context
    if args.status:
        request.status = args.status
    if args.page_token:
        request.page_token = args.page_token
    async with _connect(args.url) as client:
        page = await _store(client, args).list(request, ServerCallContext())
    if args.json:
        tasks = [
            {
                "id": t.id,
                "state": _state_name(t.status.state).lower(),
                "updated": _timestamp(t.status.timestamp, t.status.HasField("timestamp")),
                "context_id": t.context_id,
            }
            for t in page.tasks
        ]
        body = {"tasks": tasks, "total_size": page.total_size, "next_page_token": None}
        body["next_page_token"] = page.next_page_token or None
        print(json.dumps(body, sort_keys=True))
        return EXIT_OK
    if page.tasks:
        print(f"{'TASK':<36}  {'STATE':<14}  {'UPDATED':<30}  CONTEXT")
    for task in page.tasks:
        updated = _timestamp(task.status.timestamp, task.status.HasField("timestamp"))
        state = _state_name(task.status.state)
        print(f"{task.id:<36}  {state:<14}  {updated:<30}  {task.context_id}")
    print(f"{len(page.tasks)} shown, {page.total_size} in total for owner {args.owner!r}")
    if page.next_page_token:
        print(f"next page: --page-token {page.next_page_token}")
    return EXIT_OK


def _parts_summary(parts: Any, size: int) -> str:
    return f"{len(parts)} part(s), {format_size(size)}"


async def _task_get(args: argparse.Namespace) -> int:
    async with _connect(args.url) as client:
        stored = await _store(client, args).get(args.task_id, ServerCallContext())
    if stored is None:
        raise _Fail(f"task {args.task_id!r} not found for owner {args.owner!r}")
    task, version = stored.task, version_int(stored.version)
    if args.json:
        body = json_format.MessageToDict(task)
        print(json.dumps({"version": version, "task": body}, indent=2, sort_keys=True))
        return EXIT_OK
    status = task.status
    print(f"task         {task.id}")
    print(f"version      {version}")
    print(f"state        {_state_name(status.state)}")
    print(f"updated      {_timestamp(status.timestamp, status.HasField('timestamp'))}")
    print(f"context      {task.context_id}")
    if status.HasField("message"):
        msg = status.message
        print(f"status msg   {_parts_summary(msg.parts, msg.ByteSize())}")
    print(f"history      {len(task.history)} message(s)")
    print(f"artifacts    {len(task.artifacts)}")
    for artifact in task.artifacts:
        name = f" {artifact.name!r}" if artifact.name else ""
        print(
            f"  {artifact.artifact_id}{name}: {_parts_summary(artifact.parts, artifact.ByteSize())}"
        )
    metadata = json_format.MessageToDict(task.metadata) if task.HasField("metadata") else {}
    print(f"metadata     {json.dumps(metadata, sort_keys=True) if metadata else '-'}")
    return EXIT_OK


# -- tail ----------------------------------------------------------------------------------
def _describe_event(version: int, event: Event) -> str:
    """One line for an event: kinds, states, ids and sizes; never message or artifact text."""
    kind, detail = _summary(event)
    return f"v{version:<5} {kind:<16} {detail}"


def _summary(event: Event) -> tuple[str, str]:
    """An event's kind, and its states, ids and sizes (never message or artifact text)."""
    if isinstance(event, TaskStatusUpdateEvent):
        kind, detail = "status-update", _state_name(event.status.state)
        if event.status.HasField("message"):
            msg = event.status.message
            detail += f" (message: {_parts_summary(msg.parts, msg.ByteSize())})"
    elif isinstance(event, TaskArtifactUpdateEvent):
        art = event.artifact
        kind = "artifact-update"
        detail = f"artifact {art.artifact_id}: {_parts_summary(art.parts, art.ByteSize())}"
        detail += " append" * event.append + " last-chunk" * event.last_chunk
    elif isinstance(event, Task):
        kind = "task"
        detail = (
            f"{_state_name(event.status.state)}, {len(event.artifacts)} artifact(s), "
            f"{len(event.history)} message(s) in history"
        )
    elif isinstance(event, Message):
        role = Role.Name(event.role).removeprefix("ROLE_").lower()
        kind = "message"
        detail = f"{event.message_id} from {role}: {_parts_summary(event.parts, event.ByteSize())}"
    else:  # pragma: no cover - the SDK's Event union has no other member
        kind, detail = type(event).__name__, ""
    return kind, detail


def _is_final(event: Event) -> bool:
    if isinstance(event, (Task, TaskStatusUpdateEvent)):
        return event.status.state in TERMINAL_STATES
    return False


async def _tail(args: argparse.Namespace) -> int:
    async with _connect(args.url) as client:
        stored = await _store(client, args).get(args.task_id, ServerCallContext())
        if stored is None:
            raise _Fail(f"task {args.task_id!r} not found for owner {args.owner!r}")
        state = _state_name(stored.task.status.state)
        current = version_int(stored.version)
        if args.from_version is None:
            after = stored.version
            if args.until_final and stored.task.status.state in TERMINAL_STATES:
                if args.json:
                    final = {"id": args.task_id, "state": state.lower(), "version": current}
                    print(json.dumps({**final, "final": True}, sort_keys=True))
                else:
                    print(f"task {args.task_id} is already final ({state}) at version {current}")
                return EXIT_OK
        else:
            after = TaskVersion(max(args.from_version - 1, 0))
        start = "new events" if args.from_version is None else f"from version {args.from_version}"
        print(
            f"task {args.task_id}: {state} at version {current}; following {start} (Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )
        stream = RedisTaskEventStream(client, prefix=args.prefix)
        try:
            async with contextlib.aclosing(stream.subscribe(args.task_id, after=after)) as events:
                async for item in events:
                    version = version_int(item.version)
                    if args.json:
                        kind, detail = _summary(item.event)
                        line = {"version": version, "kind": kind, "detail": detail}
                        print(json.dumps(line, sort_keys=True), flush=True)
                    else:
                        print(_describe_event(version, item.event), flush=True)
                    if args.until_final and _is_final(item.event):
                        return EXIT_OK
        finally:
            await stream.aclose()
    print("the task's event stream was deleted", file=sys.stderr)
    return EXIT_OK


# -- demo ----------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    candidates = [
        Path(__file__).resolve().parent.parent / "examples" / "demo.py",
        Path.cwd() / "examples" / "demo.py",
    ]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise _Fail(
            "the demo is not installed: it is examples/demo.py in the a2a-redis source tree "
            "(run this from a checkout, or install it editable)"
        )
    if args.given_url:
        os.environ["REDIS_URL"] = args.given_url
    try:
        namespace = runpy.run_path(str(path), run_name="a2a_redis_demo")
    except ImportError as e:
        raise _Fail(
            f"the demo needs the server extra ({e}): pip install 'a2a-redis[server]'"
        ) from e
    try:
        namespace["main"]()
    except SystemExit as e:
        if isinstance(e.code, str):
            raise _Fail(f"demo: {e.code}") from e
        return int(e.code or 0)
    return EXIT_OK


# -- parser and entry point ----------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    # SUPPRESS: an option given before the command is not reset by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"Redis URL (default: $REDIS_URL, else {DEFAULT_URL})",
    )
    common.add_argument(
        "--prefix", default=argparse.SUPPRESS, help=f"key prefix (default: {DEFAULT_PREFIX})"
    )
    owner = argparse.ArgumentParser(add_help=False)
    owner.add_argument(
        "--owner", default=argparse.SUPPRESS, help='task owner (default: "", unauthenticated)'
    )
    fmt = argparse.RawDescriptionHelpFormatter
    root = argparse.ArgumentParser(
        prog="a2a-redis",
        description="Inspect an a2a-redis deployment.",
        epilog=_EPILOG,
        formatter_class=fmt,
        parents=[common],
    )
    root.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "doctor",
        parents=[common],
        formatter_class=fmt,
        epilog=_EPILOG,
        help="check the server: version, mode, latency, eviction, persistence, our keys",
        description=(
            "Check the server for a2a-redis: version, mode, round trip, eviction policy,\n"
            "persistence, our keys (count, memory, kinds; at most "
            f"{doctor.KEY_SCAN_CAP:,} keys are inspected), and the replicas running tasks.\n"
            "Exit status 0 when healthy, 3 when a problem was found, 1 on errors."
        ),
    ).add_argument(
        "--json", action="store_true", help="print {healthy, problems, report lines} as JSON"
    )
    tasks = sub.add_parser(
        "tasks", parents=[common, owner], help="list an owner's tasks (or: get, cancel, delete)"
    )
    tasks.add_argument("--context", default="", help="only tasks of this context id")
    tasks.add_argument("--status", type=_parse_state, default=0, help="only tasks in this state")
    tasks.add_argument("--page-size", type=_int_at_least(1), default=50, help="default 50")
    tasks.add_argument("--page-token", default="", help="continue a listing")
    tasks.add_argument("--json", action="store_true", help="print the page as JSON")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", metavar="get|cancel|delete")
    get = tasks_sub.add_parser("get", parents=[common, owner], help="show one task")
    get.add_argument("task_id")
    get.add_argument("--json", action="store_true", help="print {version, task} as JSON")
    tail = sub.add_parser(
        "tail",
        parents=[common, owner],
        help="follow a task's events (kinds, states, ids, sizes; never text)",
    )
    tail.add_argument("task_id")
    tail.add_argument(
        "--from-version",
        type=_int_at_least(0),
        default=None,
        help="replay retained events from this version on, then follow (default: new only)",
    )
    tail.add_argument("--until-final", action="store_true", help="stop after a terminal state")
    tail.add_argument("--json", action="store_true", help="one JSON object per event")
    cli_ops.add_task_parsers(tasks_sub, [common, owner])
    cli_migrate.add_parser(sub, [common])
    cli_ops.add_parsers(sub, [common, owner])
    push_cli.add_push_parser(sub, common, _COMMANDS)
    demo = sub.add_parser("demo", help="run the two-replica demo (embedded server by default)")
    demo.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="use this Redis (default: $REDIS_URL, else embedded)",
    )
    return root


_COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "doctor": _doctor,
    "tasks": _tasks,
    "get": _task_get,
    "tail": _tail,
    "migrate": cli_migrate.run,
    **cli_ops.COMMANDS,
}


def main(argv: list[str] | None = None) -> int:
    """Run the ``a2a-redis`` command line; return the exit status (see ``--help``)."""
    args = _parser().parse_args(argv)
    args.given_url = getattr(args, "url", None)
    args.url = args.given_url or os.environ.get("REDIS_URL") or DEFAULT_URL
    args.prefix = getattr(args, "prefix", DEFAULT_PREFIX)
    args.owner = getattr(args, "owner", "")
    try:
        if args.command == "demo":
            return _demo(args)
        command = getattr(args, "tasks_command", None) or args.command
        result: int = asyncio.run(_COMMANDS[command](args))
        return result
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (``a2a-redis tail ... | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except _Fail as e:
        print(f"a2a-redis: {e}", file=sys.stderr)
        return e.code
    except (rex.RedisError, A2ARedisError, A2AError, ValueError) as e:
        print(f"a2a-redis: {_describe_error(e, args.url)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
