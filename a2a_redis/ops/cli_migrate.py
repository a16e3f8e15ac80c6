"""The ``a2a-redis migrate`` command (its parser and its run); see ``ops/migrate.py``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from a2a_redis.connection.clients import client_from_url
from a2a_redis.connection.pool import PoolSettings

__all__ = ["add_parser", "run"]

HELP = """\
Copy the tasks of the a2a-sdk's SQL store (DatabaseTaskStore, VersionedDatabaseTaskStore,
DatabaseTaskEventStream, DatabasePushNotificationConfigStore) into Redis: owners,
versions, ListTasks indexes, retained events and push configs. Safe to repeat or resume:
a task Redis already holds at the same version is skipped, a newer one is never
overwritten (a conflict). Progress goes to stderr; the counts to stdout.

exit status: 0 done (every task copied or skipped), 1 error, 2 usage,
3 conflicts or failures (listed with their ids), or --verify found a difference
"""


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``migrate`` to the subcommands ``sub``."""
    p = sub.add_parser(
        "migrate",
        parents=parents,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="copy tasks from the SDK's SQL store into Redis",
        description=HELP,
    )
    p.add_argument("--from", dest="dsn", required=True, metavar="DSN",
                   help="SQLAlchemy async URL: sqlite+aiosqlite:///path, "
                        "postgresql+asyncpg://..., mysql+aiomysql://...")  # fmt: skip
    p.add_argument("--to", dest="url", default=argparse.SUPPRESS, help="Redis URL (as --url)")
    p.add_argument("--dry-run", action="store_true", help="count what would be copied")
    p.add_argument("--verify", action="store_true", help="then compare every task, proto for proto")
    p.add_argument(
        "--encryption-key",
        default=None,
        help="Fernet key of the SQL push configs; they stay encrypted in Redis",
    )
    p.add_argument(
        "--redis-encryption-key",
        default=None,
        help="encrypt push configs in Redis with this key instead (re-encrypt)",
    )
    p.add_argument("--tasks-table", default="tasks")
    p.add_argument("--versions-table", default="task_versions")
    p.add_argument("--events-table", default="task_events")
    p.add_argument("--push-table", default="push_notification_configs")
    p.add_argument("--batch", type=int, default=500, help="SQL rows per read (default 500)")
    p.add_argument("--concurrency", type=int, default=32, help="writes in flight (default 32)")
    p.add_argument(
        "--after", default="", help="resume after this task id (ids are copied in order)"
    )
    p.add_argument("--json", action="store_true", help="print the counts as one JSON object")


def _print_counts(title: str, counts: dict[str, Any], as_json: bool) -> None:
    if as_json:
        return
    print(
        f"{title}: {counts['copied']} copied, {counts['skipped']} skipped, "
        f"{counts['conflicts']} conflicts, {counts['failures']} failures "
        f"({counts['push_configs']} push configs, {counts['events']} events)"
    )
    for task_id in counts["conflict_ids"]:
        print(f"  conflict: {task_id} (Redis holds a newer version, or another owner's task)")
    for failure in counts["failed"]:
        print(f"  failed:   {failure['id']}: {failure['error']}")


async def run(args: argparse.Namespace) -> int:
    """Run ``migrate``; the exit status."""
    from sqlalchemy.exc import SQLAlchemyError

    from a2a_redis.ops.migrate import Progress, migrate, verify
    from a2a_redis.ops.sql_source import SqlSource, Tables

    tables = Tables(args.tasks_table, args.versions_table, args.events_table, args.push_table)
    source = SqlSource(args.dsn, tables, encryption_key=args.encryption_key, batch=args.batch)
    client = client_from_url(
        args.url, PoolSettings(max_connections=2 * args.concurrency + 4, retries=1)
    )
    result: dict[str, Any] = {"dry_run": args.dry_run}
    try:
        await client.ping()
        try:
            await source.open()
        except SQLAlchemyError as e:
            raise ValueError(f"cannot read the SQL source: {str(e).splitlines()[0]}") from e
        progress = Progress(await source.count())
        try:
            counts = await migrate(
                source, client, args.prefix,
                encryption_key=args.redis_encryption_key or args.encryption_key,
                dry_run=args.dry_run, concurrency=args.concurrency, progress=progress,
                after=args.after,
            )  # fmt: skip
        finally:
            progress.close()
        result["migrate"] = counts.as_dict()
        _print_counts("would copy" if args.dry_run else "migrate", result["migrate"], args.json)
        bad = counts.conflicts + counts.failures
        if args.verify:
            checked = await verify(source, client, args.prefix)
            result["verify"] = {
                "matching": checked.copied,
                "differing": checked.failures,
                "differences": [{"id": i, "error": e} for i, e in checked.failed],
            }
            if not args.json:
                print(f"verify: {checked.copied} matching, {checked.failures} differing")
                for task_id, why in checked.failed:
                    print(f"  differs:  {task_id}: {why}")
            bad += checked.failures
    finally:
        await source.aclose()
        await client.aclose()
    if args.json:
        json.dump(result, sys.stdout, sort_keys=True)
        print()
    return 3 if bad else 0
