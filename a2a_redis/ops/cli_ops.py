"""The operator verbs of ``a2a-redis``: export, import, tasks cancel/delete, purge, stats.

Their parsers and runs (see ``admin.py`` and ``transfer.py``). Each takes ``--json``;
errors are one line, with the documented exit codes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from a2a.server.cluster import ConcurrentTaskModificationError
from a2a.utils.errors import TaskNotCancelableError, TaskNotFoundError

from a2a_redis.ops import admin, transfer
from a2a_redis.ops.cli_common import (
    EXIT_OK,
    EXIT_PROBLEM,
    Fail,
    connect,
    int_at_least,
    parse_state,
    state_name,
)
from a2a_redis.ops.migrate import Progress
from a2a_redis.ops.report import size

__all__ = ["COMMANDS", "add_parsers", "add_task_parsers"]

TERMINAL = "completed,failed,canceled,rejected"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> float:
    """Seconds from ``30d``, ``12h``, ``90m``, ``3600s``, ``2w`` (argparse type)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (say 30d, 12h, 90m, 3600s)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def states(text: str) -> list[int]:
    """A comma-separated list of states (argparse type)."""
    return [parse_state(part) for part in text.split(",") if part.strip()]


def _emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(obj, sort_keys=True))
    else:
        print(text)


def add_task_parsers(tasks_sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``tasks cancel ID`` and ``tasks delete ID``."""
    cancel = tasks_sub.add_parser(
        "cancel",
        parents=parents,
        help="cancel: forwarded to the replica running it, else CANCELED by versioned CAS",
    )
    cancel.add_argument("task_id")
    cancel.add_argument(
        "--no-forward",
        action="store_true",
        help="only record CANCELED (the replica running the agent stops it at its next write)",
    )
    cancel.add_argument("--json", action="store_true", help="print the result as JSON")
    delete = tasks_sub.add_parser("delete", parents=parents, help="delete a task")
    delete.add_argument("task_id")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.add_argument("--json", action="store_true", help="print the result as JSON")


def add_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``export``, ``import``, ``purge`` and ``stats``."""
    common, owner = parents
    exp = sub.add_parser("export", parents=[common], help="write tasks as NDJSON (format 1)")
    exp.add_argument("--owner", default=None, help="only this owner's tasks (default: all)")
    exp.add_argument("--state", type=parse_state, default=0, help="only tasks in this state")
    exp.add_argument("--output", "-o", default="-", help="file (default: stdout)")
    exp.add_argument("--no-events", action="store_true", help="leave the retained events out")
    exp.add_argument(
        "--no-push-configs", action="store_true", help="leave push configs (with tokens) out"
    )
    exp.add_argument("--encryption-key", default=None, help="to read encrypted push configs")
    exp.add_argument("--json", action="store_true", help="print the count as JSON on stderr")
    imp = sub.add_parser("import", parents=[common], help="write an export back (idempotent)")
    imp.add_argument("--input", "-i", default="-", help="file (default: stdin)")
    imp.add_argument("--dry-run", action="store_true", help="count what would be written")
    imp.add_argument("--encryption-key", default=None, help="store push configs encrypted")
    imp.add_argument("--json", action="store_true", help="print the counts as JSON")
    purge = sub.add_parser(
        "purge", parents=[common, owner], help="delete old tasks in some states (index-driven)"
    )
    purge.add_argument("--state", type=states, default=states(TERMINAL), help=f"default {TERMINAL}")
    purge.add_argument("--older-than", type=duration, required=True, help="30d, 12h, 90m, ...")
    purge.add_argument("--all-owners", action="store_true", help="every owner (SCAN over indexes)")
    purge.add_argument("--batch", type=int_at_least(1), default=500, help="default 500")
    purge.add_argument("--dry-run", action="store_true", help="count what would be deleted")
    purge.add_argument("--json", action="store_true", help="print the counts as JSON")
    stats = sub.add_parser("stats", parents=[common, owner], help="task counts by state")
    stats.add_argument("--all-owners", action="store_true", help="every owner (SCAN over indexes)")
    stats.add_argument(
        "--top",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="only the N owners with the most tasks (implies --all-owners)",
    )
    stats.add_argument(
        "--keys", action="store_true", help="also keys and memory by kind (a capped SCAN)"
    )
    stats.add_argument("--json", action="store_true", help="print the counts as JSON")


async def _cancel(args: argparse.Namespace) -> int:
    async with connect(args.url) as client:
        try:
            version, state, forwarded = await admin.cancel(
                client, args.prefix, args.owner, args.task_id, forward=not args.no_forward
            )
        except TaskNotFoundError:
            raise Fail(f"task {args.task_id!r} not found for owner {args.owner!r}") from None
        except ConcurrentTaskModificationError:
            raise Fail(f"task {args.task_id!r} is already in a terminal state") from None
        except TaskNotCancelableError as e:
            raise Fail(f"task {args.task_id!r} cannot be canceled: {e}") from None
    name = state_name(state).lower()
    result = {"id": args.task_id, "state": name, "version": version, "forwarded": forwarded}
    by = " by the replica running it" if forwarded else ""
    _emit(args, result, f"task {args.task_id} {name}{by} at version {version}")
    return EXIT_OK


async def _delete(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise Fail("refusing to delete without --yes (stdin is not a terminal)", 2)
        answer = input(f"delete task {args.task_id} of owner {args.owner!r}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise Fail("not deleted")
    async with connect(args.url) as client:
        if not await admin.delete(client, args.prefix, args.owner, args.task_id):
            raise Fail(f"task {args.task_id!r} not found for owner {args.owner!r}")
    _emit(args, {"id": args.task_id, "deleted": True}, f"task {args.task_id} deleted")
    return EXIT_OK


async def _export(args: argparse.Namespace) -> int:
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    try:
        async with connect(args.url) as client:
            count = await transfer.export(
                client, args.prefix, out, owner=args.owner, state=args.state,
                events=not args.no_events, push_configs=not args.no_push_configs,
                encryption_key=args.encryption_key,
            )  # fmt: skip
    finally:
        if out is not sys.stdout:
            out.close()
    note = json.dumps({"exported": count}) if args.json else f"{count} task(s) exported"
    print(note, file=sys.stderr)
    return EXIT_OK


async def _import(args: argparse.Namespace) -> int:
    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")  # noqa: SIM115
    try:
        async with connect(args.url, writers=32) as client:
            progress = Progress(0)
            try:
                counts = await transfer.import_lines(
                    client, args.prefix, source, encryption_key=args.encryption_key,
                    dry_run=args.dry_run, progress=progress,
                )  # fmt: skip
            finally:
                progress.close()
    finally:
        if source is not sys.stdin:
            source.close()
    result = counts.as_dict()
    lines = [
        f"import: {counts.copied} written, {counts.skipped} skipped, {counts.conflicts} "
        f"conflicts, {counts.failures} failures",
        *(f"  conflict: {i}" for i in counts.conflict_ids),
        *(f"  failed:   {f[1] if not f[0] else f'{f[0]}: {f[1]}'}" for f in counts.failed),
    ]
    _emit(args, result, "\n".join(lines))
    return EXIT_PROBLEM if counts.conflicts or counts.failures else EXIT_OK


async def _purge(args: argparse.Namespace) -> int:
    async with connect(args.url, writers=32) as client:
        owners = await admin.owners(client, args.prefix) if args.all_owners else [args.owner]
        result: dict[str, Any] = {"dry_run": args.dry_run, "owners": {}}
        progress = Progress(0)  # a line per 10,000 tasks on stderr (a bar on a terminal)
        try:
            for owner in owners:
                result["owners"][owner] = await admin.purge(
                    client, args.prefix, owner, args.state, args.older_than,
                    dry_run=args.dry_run, batch=args.batch, progress=progress,
                )  # fmt: skip
        finally:
            progress.close()
    result["total"] = sum(sum(c.values()) for c in result["owners"].values())
    verb = "would delete" if args.dry_run else "deleted"
    text = [f"{verb} {result['total']} task(s)"]
    for owner, counts in result["owners"].items():
        shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none"
        text.append(f"  owner {owner!r}: {shown}")
    _emit(args, result, "\n".join(text))
    return EXIT_OK


async def _stats(args: argparse.Namespace) -> int:
    every = args.all_owners or args.top is not None
    async with connect(args.url) as client:
        owners = await admin.owners(client, args.prefix) if every else [args.owner]
        per_owner = [await admin.stats(client, args.prefix, o) for o in owners]
        kinds = await admin.key_kinds(client, args.prefix) if args.keys else None
    per_owner.sort(key=lambda s: (-s["tasks"], s["owner"]))
    result: dict[str, Any] = {
        "owners": per_owner[: args.top],  # (None: all of them)
        "owner_count": len(per_owner),
        "tasks": sum(s["tasks"] for s in per_owner),
    }
    text = [f"{result['tasks']} task(s), {len(per_owner)} owner(s)"]
    if len(result["owners"]) < len(per_owner):
        text.append(f"top {args.top} owner(s) by tasks:")
    per_owner = result["owners"]
    for s in per_owner:
        shown = ", ".join(f"{n} {name}" for name, n in s["by_state"].items()) or "-"
        text.append(f"  owner {s['owner']!r}: {s['tasks']} ({shown})")
    if kinds is not None:
        result["keys"] = kinds
        more = " (counting stopped there)" if kinds["capped"] else ""
        text.append(f"{kinds['keys']:,} key(s){more}")
        for kind, entry in kinds["by_kind"].items():
            memory = "memory unknown" if entry["bytes"] is None else size(entry["bytes"])
            text.append(f"  {kind:<8} {entry['keys']:>8,}  {memory}")
    _emit(args, result, "\n".join(text))
    return EXIT_OK


COMMANDS = {
    "cancel": _cancel,
    "delete": _delete,
    "export": _export,
    "import": _import,
    "purge": _purge,
    "stats": _stats,
}
