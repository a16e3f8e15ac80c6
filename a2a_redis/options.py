"""``Options``: the settings every component of one backend shares, in one frozen object.

One dataclass instead of the same keyword arguments threaded through every constructor (arq's
``RedisSettings`` is the model). ``RedisBackend`` builds it once and hands it to each
component through ``from_options``; each component's own constructor still takes these as
keyword arguments, and builds its ``Options`` from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from a2a.server.owner_resolver import OwnerResolver, resolve_user_scope

from a2a_redis.connection.durability import Durability
from a2a_redis.log.codec import MAX_PAYLOAD_BYTES
from a2a_redis.log.event_log import StreamRetention
from a2a_redis.log.keys import Keys

__all__ = [
    "DEFAULT_CANCEL_TIMEOUT",
    "DEFAULT_LEASE_TTL",
    "DEFAULT_MAX_ATTEMPTS",
    "ORPHAN_POLICIES",
    "Options",
]

DEFAULT_LEASE_TTL = 10.0
DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_CANCEL_TIMEOUT = 2.0
#: "fail": a surviving replica ends a dead replica's running tasks FAILED; "keep": they
#: stay as they are (subscribers get ``OwnerLostError``).
ORPHAN_POLICIES = ("fail", "keep")
#: Under "fail", how many lease TTLs a subscriber waits for the FAILED event before it
#: gives up with ``OwnerLostError`` anyway (the reaper writes it within 3).
FAIL_GRACE = 4


@dataclass(frozen=True, slots=True)
class Options:
    """What the stores, the event stream and the queue manager of one namespace share.

    Attributes:
        prefix: Key namespace (default ``"a2a"``); see :class:`~a2a_redis.Keys`.
        owner_resolver: Maps a call context to its owner (default: the user name).
        terminal_ttl: Seconds to keep a task after a write in a terminal state; None (the
            default) keeps tasks forever, as a database would.
        stream_retention: Cap and TTLs of each task's event stream.
        lease_ttl: Seconds the lease of a task this replica runs lasts without renewal
            (after the replica dies, remote subscribers end within about this long).
        durability: Replicas that must confirm every write (``WAIT``); None waits for none.
        max_payload_bytes: Largest encoded Task, event or push config written (8 MiB).
        max_attempts: Optimistic-transaction attempts per task write before giving up.
        cancel_timeout: Seconds a replica waits for the replica running a task to answer a
            forwarded cancel before it records CANCELED itself (default 2).
        orphan_policy: ``"fail"`` (default): a task whose replica died is ended FAILED by a
            survivor within ``3 * lease_ttl``; ``"keep"``: it stays as it was.
    """

    prefix: str = "a2a"
    owner_resolver: OwnerResolver = resolve_user_scope
    terminal_ttl: float | None = None
    stream_retention: StreamRetention = field(default_factory=StreamRetention)
    lease_ttl: float = DEFAULT_LEASE_TTL
    durability: Durability | None = None
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    cancel_timeout: float = DEFAULT_CANCEL_TIMEOUT
    orphan_policy: str = "fail"

    def owner_silence(self, ttl: float) -> float:
        """Seconds a running task's owner (lease ``ttl``) may be silent.

        After that its subscribers give up; under "fail", the reaper's FAILED comes first.
        """
        return ttl * (FAIL_GRACE if self.orphan_policy == "fail" else 1)

    def __post_init__(self) -> None:
        Keys(self.prefix)  # ValueError for an invalid prefix
        if self.terminal_ttl is not None and not self.terminal_ttl > 0:
            raise ValueError("terminal_ttl must be positive seconds, or None to keep tasks")
        if not self.lease_ttl > 0:
            raise ValueError("lease_ttl must be positive seconds")
        if self.max_payload_bytes < 1:
            raise ValueError("max_payload_bytes must be a positive number of bytes")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not self.cancel_timeout > 0:
            raise ValueError("cancel_timeout must be positive seconds")
        if self.orphan_policy not in ORPHAN_POLICIES:
            raise ValueError(f"orphan_policy must be one of {ORPHAN_POLICIES}")
