"""``a2a-redis push dead [--task ID]`` and ``a2a-redis push retry [--task ID]``.

``push dead`` lists dead letters, oldest first: entry id, task, config id, version, attempts,
last error and notification id (never a URL, token or body: dead letters hold none).
``push retry`` re-queues them as delivery jobs; running replicas' senders deliver them, in
version order per task and config, with fresh attempts (see ``a2a_redis/push/dead.py``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from a2a_redis.connection.clients import client_from_url
from a2a_redis.connection.pool import PoolSettings
from a2a_redis.log.keys import Keys
from a2a_redis.push.dead import dead_letters, retry_dead

__all__ = ["add_push_parser", "run_push"]


def add_push_parser(sub: Any, common: argparse.ArgumentParser, commands: dict[str, Any]) -> None:
    """Register ``push dead`` and ``push retry`` under ``sub``, and ``run_push`` in ``commands``."""
    commands["push"] = run_push
    push = sub.add_parser("push", parents=[common], help="push dead letters: list (dead), retry")
    push_sub = push.add_subparsers(dest="push_command", required=True, metavar="dead|retry")
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
