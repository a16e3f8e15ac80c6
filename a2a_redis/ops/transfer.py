"""``a2a-redis export`` and ``import``: one prefix's tasks as newline-delimited JSON.

Format 1 (one JSON object per line, keys sorted, UTF-8; ``jq -c 'select(.kind=="task")'``):

* line 1, the header: ``{"format": 1, "kind": "a2a-redis-export"}``;
* one line per task: ``{"kind": "task", "id": ..., "owner": ..., "version": N,
  "task": <the Task in protobuf JSON>, "events": [{"version": V, "event": <StreamResponse
  in protobuf JSON>}, ...], "push_configs": [{"owner": ..., "config":
  <TaskPushNotificationConfig in protobuf JSON>}, ...]}``;
* the last line: ``{"kind": "end", "tasks": N}``; a file without it was truncated.

Tasks are in id order (without ``--owner``: the ids found by SCAN, sorted) or in the
owner's ListTasks order (with ``--owner``), so that exporting what was imported gives the
same file. ``events`` are those the task's stream retains (see ``stream_retention``).
Push configs are written in clear, tokens included: protect the file, or pass
``--no-push-configs``; reading encrypted ones needs the store's ``--encryption-key``.

Import writes each task line whole (task, events and configs) through ``ops/migrate.py``'s
``Migrator``, with the same rules: same version skipped, newer in Redis a conflict, an older
one brought up to date. A line that cannot be read (not JSON, a field missing, a proto that
does not parse) is a failure naming its line, and nothing of it is written.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import AsyncIterator, Iterable
from typing import Any, TextIO

from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import (
    ListTasksRequest,
    StreamResponse,
    Task,
    TaskPushNotificationConfig,
)
from a2a.utils.proto_utils import to_stream_response
from google.protobuf import json_format

from a2a_redis.connection.cluster import Client, is_cluster
from a2a_redis.connection.transaction import execute
from a2a_redis.log.codec import F_OWNER, F_SCHEMA, F_TASK, F_VERSION, decode_event, decode_stored
from a2a_redis.log.keys import Keys
from a2a_redis.ops.migrate import Counts, Migrator, Progress
from a2a_redis.ops.sql_source import SourceTask
from a2a_redis.stores.push_config_store import RedisPushNotificationConfigStore
from a2a_redis.stores.task_index import TaskIndex

__all__ = ["FORMAT", "export", "import_lines"]

_OWNER = "a2a_redis_export_owner"
FORMAT = 1
HEADER = {"format": FORMAT, "kind": "a2a-redis-export"}
BATCH = 500


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


def _dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message)


async def _ids_of_owner(
    client: Client, keys: Keys, owner: str, state: int
) -> AsyncIterator[list[str]]:
    """The owner's task ids in ListTasks order, a page at a time (index-driven)."""
    index = TaskIndex(client, keys, split=is_cluster(client))
    token = ""
    while True:
        request = ListTasksRequest(page_size=BATCH, page_token=token, status=state)  # type: ignore[arg-type]
        page = await index.query(owner, request)
        if page.tasks:
            yield [t.id for t in page.tasks]
        if not page.next_page_token:
            return
        token = page.next_page_token


async def _all_ids(client: Client, keys: Keys) -> AsyncIterator[list[str]]:
    """Every task id of the prefix (SCAN: an admin command), sorted, a batch at a time."""
    head = keys.scan_pattern()[:-1]  # "P:" escaped
    ids = []
    async for raw in client.scan_iter(match=head + "{t:*}:task", count=1000):
        text = raw.decode() if isinstance(raw, bytes) else raw
        encoded = text[len(keys.prefix) + 4 : -len("}:task")]
        ids.append(urllib.parse.unquote(encoded, errors="surrogatepass"))
    ids.sort()
    for start in range(0, len(ids), BATCH):
        yield ids[start : start + BATCH]


async def export(
    client: Client,
    prefix: str,
    out: TextIO,
    *,
    owner: str | None = None,
    state: int = 0,
    events: bool = True,
    push_configs: bool = True,
    encryption_key: str | bytes | None = None,
) -> int:
    """Write the prefix's tasks (the owner's, in a state) to ``out``; return how many."""
    keys = Keys.for_client(client, prefix)
    push = RedisPushNotificationConfigStore(
        client,
        prefix=prefix,
        encryption_key=encryption_key,
        owner_resolver=lambda ctx: str(ctx.state[_OWNER]),
    )
    out.write(_line(HEADER))
    count = 0
    ids = _all_ids(client, keys) if owner is None else _ids_of_owner(client, keys, owner, state)
    async for batch in ids:
        async with client.pipeline(transaction=False) as pipe:
            for task_id in batch:
                pipe.hmget(keys.task(task_id), [F_SCHEMA, F_OWNER, F_VERSION, F_TASK])
                pipe.xrange(keys.events(task_id), count=1 if not events else None)
                pipe.hkeys(keys.push_configs(task_id))
            rows = await execute(pipe)
        for i, task_id in enumerate(batch):
            head, entries, config_fields = rows[i * 3 : i * 3 + 3]
            stored = decode_stored(keys.task(task_id), task_id, head)
            if stored is None:
                continue  # deleted meanwhile
            task_owner, task, version = stored
            if (owner is not None and task_owner != owner) or (
                state and task.status.state != state
            ):
                continue
            record: dict[str, Any] = {
                "kind": "task", "id": task_id, "owner": task_owner, "version": version,
                "task": _dict(task), "events": [], "push_configs": [],
            }  # fmt: skip
            for _, fields in entries if events else ():
                at, event = decode_event(keys.events(task_id), fields)
                if event is not None:
                    record["events"].append(
                        {"version": at, "event": _dict(to_stream_response(event))}
                    )
            for config_owner in _owners(config_fields) if push_configs else []:
                context = ServerCallContext(state={_OWNER: config_owner})
                for config in await push.get_info(task_id, context):
                    record["push_configs"].append({"owner": config_owner, "config": _dict(config)})
            out.write(_line(record))
            count += 1
    out.write(_line({"kind": "end", "tasks": count}))
    return count


def _owners(fields: list[bytes]) -> list[str]:
    """The owners with configs in a push hash (fields ``encode_id(owner):encode_id(id)``)."""
    owners = set()
    for raw in fields:
        text = raw.decode("ascii", "replace")
        if not text.startswith("#") and ":" in text:
            owners.add(urllib.parse.unquote(text.split(":", 1)[0], errors="surrogatepass"))
    return sorted(owners)


def _parse(number: int, text: str) -> SourceTask | dict[str, Any]:
    """A task line as a SourceTask (its error naming the line if it cannot be read)."""
    if not text.endswith("\n"):
        return SourceTask("", "", 0, error=f"line {number}: truncated (no end of line)")
    try:
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if obj.get("kind") != "task":
            return obj
        item = SourceTask(str(obj["id"]), str(obj["owner"]), int(obj["version"]))
        item.task = json_format.ParseDict(obj["task"], Task())
        if item.task.id != item.task_id:
            raise ValueError(f"task id {item.task.id!r} is not the line's id {item.task_id!r}")
        for entry in obj["events"]:
            response = json_format.ParseDict(entry["event"], StreamResponse())
            which = response.WhichOneof("payload")
            if which is None:
                raise ValueError("an event with no payload")
            item.events.append((int(entry["version"]), getattr(response, which)))
        for entry in obj["push_configs"]:
            config = json_format.ParseDict(entry["config"], TaskPushNotificationConfig())
            item.push_configs.append((str(entry["owner"]), config))
    except (ValueError, KeyError, TypeError, json_format.ParseError) as e:
        return SourceTask("", "", 0, error=f"line {number}: {type(e).__name__}: {e}"[:300])
    return item


async def import_lines(
    client: Client,
    prefix: str,
    lines: Iterable[str],
    *,
    encryption_key: str | bytes | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> Counts:
    """Import an export (format 1) into ``prefix``; the counts (failures name their line)."""
    migrator = Migrator(client, prefix, encryption_key=encryption_key, dry_run=dry_run)
    batch: list[SourceTask] = []
    number, ended = 0, False
    for number, text in enumerate(lines, 1):
        if number == 1:
            try:
                header = json.loads(text)
            except ValueError:
                header = None
            if header != HEADER:
                raise ValueError(f"line 1: not an a2a-redis export of format {FORMAT}")
            continue
        if ended:
            raise ValueError(f"line {number}: data after the end record")
        parsed = _parse(number, text)
        if isinstance(parsed, dict):
            if parsed.get("kind") != "end":
                migrator.counts.fail("", f"line {number}: unknown kind {parsed.get('kind')!r}")
            ended = True
            continue
        if parsed.error:
            migrator.counts.seen += 1
            migrator.counts.fail(parsed.task_id, parsed.error)
            continue
        batch.append(parsed)
        if len(batch) >= BATCH:
            await _flush(migrator, batch, progress)
    await _flush(migrator, batch, progress)
    if number == 0:
        raise ValueError("the input is empty")
    if not ended:
        migrator.counts.fail("", f"line {number}: the file ends without its end record (truncated)")
    return migrator.counts


async def _flush(migrator: Migrator, batch: list[SourceTask], progress: Progress | None) -> None:
    if not batch:
        return
    await migrator.copy_batch(batch)
    if progress is not None:
        progress.advance(len(batch))
    batch.clear()
