"""Dead letters: push notifications that could not be delivered, listed and re-queued.

Each entry of ``keys.push_dead`` (``MAXLEN ~``, expiring after the sender's ``dead_ttl``
past the last one) has the fields ``t`` task id, ``f`` config field (encoded owner and
config id), ``c`` config id, ``o`` encoded owner, ``v`` version, ``n`` notification id,
``e`` the last error (an HTTP status or an exception class, never a body, URL or header)
and ``k`` attempts. :func:`retry_dead` turns them back into delivery jobs
(``RedisPushNotificationSender`` replays those versions, in order, per task and config).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, cast

from redis import exceptions as rex

from a2a_redis.connection.cluster import Client
from a2a_redis.errors import CorruptDataError, redis_errors
from a2a_redis.log.codec import utf8
from a2a_redis.log.keys import Keys
from a2a_redis.push.scripts import GROUP
from a2a_redis.stores.push_config_store import JOBS_MAXLEN

__all__ = ["DeadLetter", "dead_letters", "delivery_status", "retry_dead"]

_PAGE = 500


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter (see the module docstring)."""

    entry_id: bytes
    task_id: str
    field: bytes
    config_id: str
    version: int
    notification_id: str
    error: str
    attempts: int


def _decode(key: str, entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    try:
        return DeadLetter(
            entry_id=entry_id,
            task_id=fields[b"t"].decode("utf-8", "surrogatepass"),
            field=fields[b"f"],
            config_id=fields[b"c"].decode("utf-8", "surrogatepass"),
            version=int(fields[b"v"]),
            notification_id=fields[b"n"].decode(),
            error=fields[b"e"].decode(errors="replace"),
            attempts=int(fields[b"k"]),
        )
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        raise CorruptDataError(f"dead letter {entry_id!r} is malformed: {e!r}", key=key) from e


async def dead_letters(
    redis: Client, keys: Keys, *, task_id: str | None = None, count: int | None = None
) -> list[DeadLetter]:
    """Dead letters, oldest first (only ``task_id``'s if given; at most ``count``).

    One XRANGE per :data:`_PAGE` entries; the stream is capped, so this is bounded.
    """
    key, start = keys.push_dead, "-"
    out: list[DeadLetter] = []
    while count is None or len(out) < count:
        with redis_errors("read push dead letters", key):
            rows = cast("list[Any]", await redis.xrange(key, min=start, max="+", count=_PAGE))
        for entry_id, fields in rows:
            letter = _decode(key, entry_id, fields)
            if task_id is None or letter.task_id == task_id:
                out.append(letter)
        if len(rows) < _PAGE:
            break
        start = "(" + rows[-1][0].decode()
    return out if count is None else out[:count]


async def retry_dead(redis: Client, keys: Keys, *, task_id: str | None = None) -> int:
    """Re-queue dead letters (only ``task_id``'s if given); returns how many.

    Per (task, config): one MULTI/EXEC that adds a replay job for their versions and
    deletes them (both streams share the ``{push}`` slot). A running sender's workers
    deliver them, in version order, with fresh attempts.
    """
    groups: dict[tuple[str, bytes], list[DeadLetter]] = defaultdict(list)
    for letter in await dead_letters(redis, keys, task_id=task_id):
        groups[(letter.task_id, letter.field)].append(letter)
    for (task, field), letters in groups.items():
        versions = b",".join(b"%d" % v for v in sorted({x.version for x in letters}))
        job = {b"t": utf8(task), b"f": field, b"r": versions}
        with redis_errors("retry push dead letters", keys.push_dead):
            async with redis.pipeline(transaction=True) as pipe:
                pipe.xadd(keys.push_jobs, job, maxlen=JOBS_MAXLEN, approximate=True)  # type: ignore[arg-type]
                pipe.xdel(keys.push_dead, *(x.entry_id for x in letters))
                await pipe.execute()
    return sum(len(v) for v in groups.values())


async def delivery_status(redis: Client, keys: Keys) -> dict[str, Any]:
    """What the server holds of push delivery, for ``doctor`` and ``push status``.

    ``jobs`` (entries of the job stream: (task, config) pairs being delivered or waiting),
    ``pending`` (jobs held by a replica's worker), ``consumers`` (holding at least one) and
    ``dead`` (dead letters kept). One round trip (a pipeline on the ``{push}`` slot); a
    group not created yet (no sender ever ran) counts as none pending.
    """
    with redis_errors("read push delivery status", keys.push_jobs):
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xlen(keys.push_jobs)
            pipe.xlen(keys.push_dead)
            pipe.xpending(keys.push_jobs, GROUP)
            jobs, dead, pending = await pipe.execute(raise_on_error=False)
    for value in (jobs, dead):
        if isinstance(value, Exception):
            raise value
    if isinstance(pending, rex.ResponseError) and str(pending).startswith("NOGROUP"):
        pending = {"pending": 0, "consumers": []}
    elif isinstance(pending, Exception):
        raise pending
    held = [c for c in pending.get("consumers") or [] if int(c.get("pending", 0)) > 0]
    return {
        "jobs": int(jobs),
        "pending": int(pending.get("pending") or 0),
        "consumers": len(held),
        "dead": int(dead),
    }
