"""What a lease token and a replica's task set hold: who runs a task, for how long.

A lease token is ``<replica id>-<nonce>:<ttl ms>`` (``leases.py`` writes it): any replica
reads from it which replica runs the task (to forward it a cancel) and how long that
replica's lease lasts (to know when its silence means it died). A replica's task set
(``keys.replica_tasks``) holds task ids as UTF-8 bytes, lone surrogates kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["lease_ttl_of", "members", "new_replica_id", "replica_of", "task_of"]


def members(task_ids: Iterable[str]) -> list[bytes]:
    """Task ids as members of a replica's task set: UTF-8, lone surrogates kept."""
    return [task_id.encode("utf-8", "surrogatepass") for task_id in task_ids]


def task_of(member: bytes) -> str:
    """The task id a member of a replica's task set names (see :func:`members`)."""
    return member.decode("utf-8", "surrogatepass")


def new_replica_id() -> str:
    """A fresh replica id: 16 lower-case hex digits."""
    return os.urandom(8).hex()


def replica_of(token: bytes | None) -> str | None:
    """The id of the replica that wrote a lease token (None for a foreign token)."""
    if not token:
        return None
    head, sep, _ = token.partition(b"-")
    if not sep or not 0 < len(head) <= 32 or head.strip(b"0123456789abcdef"):
        return None
    return head.decode()


def lease_ttl_of(token: bytes | None, default: float) -> float:
    """The owner's lease TTL in seconds, read from its lease token (``default`` if foreign)."""
    if not token:
        return default
    _, _, ttl_ms = token.rpartition(b":")
    valid = ttl_ms.isdigit() and len(ttl_ms) < 10 and int(ttl_ms) > 0  # (int(): 4,300 digits)
    return int(ttl_ms) / 1000 if valid else default
