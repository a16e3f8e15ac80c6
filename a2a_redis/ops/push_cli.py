"""``a2a-redis push dead [--task ID]``, ``push retry [--task ID]`` and ``push status``.

``push dead`` lists dead letters, oldest first: entry id, task, config id, version, attempts,
last error and notification id (never a URL, token or body: dead letters hold none).
``push retry`` re-queues them as delivery jobs; running replicas' senders deliver them, in
version order per task and config, with fresh attempts (see ``a2a_redis/push/dead.py``).
``push status`` prints what the server holds of delivery: jobs, pending (held by a
replica's worker), consumers holding them, dead letters; ``doctor`` prints the same line.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from a2a_redis.connection.clients import client_from_url
from a2a_redis.connection.cluster import Client
from a2a_redis.connection.pool import PoolSettings
from a2a_redis.log.keys import Keys
from a2a_redis.ops.report import Report
from a2a_redis.push.dead import dead_letters, delivery_status, retry_dead

__all__ = ["add_push_parser", "push_report", "run_push"]


async def push_report(client: Client, keys: Keys, report: Report) -> None:
    """The ``push delivery`` line of ``doctor`` and ``push status`` (one round trip)."""
    s = await delivery_status(client, keys)
    report.line(
        "push delivery",
        f"{s['jobs']:,} job(s), {s['pending']:,} held by {s['consumers']} replica(s), "
        f"{s['dead']:,} dead letter(s)",
    )


def add_push_parser(sub: Any, common: argparse.ArgumentParser, commands: dict[str, Any]) -> None:
    """Register ``push dead`` and ``push retry`` under ``sub``, and ``run_push`` in ``commands``."""
    commands["push"] = run_push
    push = sub.add_parser(
        "push", parents=[common], help="push delivery: status, dead letters (dead), retry"
    )
    push_sub = push.add_subparsers(dest="push_command", required=True, metavar="status|dead|retry")
    push_sub.add_parser("status", parents=[common], help="jobs, pending and dead letters")
    dead = push_sub.add_parser("dead", parents=[common], help="list dead letters, oldest first")
    dead.add_argument("--task", default=None, help="only this task's")
    dead.add_argument("--count", type=int, default=100, help="at most this many (default 100)")
    retry = push_sub.add_parser(
        "retry", parents=[common], help="re-queue dead letters for delivery"
    )
    retry.add_argument("--task", default=None, help="only this task's")
    for each in (dead, retry):
        each.add_argument("--json", action="store_true", help="print the result as JSON")


async def run_push(args: argparse.Namespace) -> int:
    """Run ``push dead`` or ``push retry``; the exit status."""
    client = client_from_url(args.url, PoolSettings(max_connections=8, retries=0))
    try:
        await client.ping()
        keys = Keys.for_client(client, args.prefix)
        if args.push_command == "status":
            await push_report(client, keys, Report())
            return 0
        if args.push_command == "retry":
            n = await retry_dead(client, keys, task_id=args.task)
            print(json.dumps({"requeued": n}) if args.json else f"{n} dead letter(s) re-queued")
            return 0
        letters = await dead_letters(client, keys, task_id=args.task, count=max(args.count, 1))
        if args.json:
            rows = [
                {
                    "entry_id": x.entry_id.decode(), "task_id": x.task_id,
                    "config_id": x.config_id, "version": x.version, "attempts": x.attempts,
                    "error": x.error, "notification_id": x.notification_id,
                }
                for x in letters
            ]  # fmt: skip
            print(json.dumps({"dead_letters": rows, "count": len(rows)}, sort_keys=True))
            return 0
        if letters:
            print(f"{'ENTRY':<16}  {'TASK':<36}  {'CONFIG':<20}  VERSION  ATTEMPTS  ERROR")
        for x in letters:
            print(
                f"{x.entry_id.decode():<16}  {x.task_id:<36}  {x.config_id:<20}  "
                f"{x.version:>7}  {x.attempts:>8}  {x.error}  (id {x.notification_id})"
            )
        print(f"{len(letters)} dead letter(s)")
        return 0
    finally:
        await client.aclose()
