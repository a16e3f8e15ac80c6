"""Every Redis key and channel a2a-redis uses is built here, from one configurable prefix.

Layout (``P`` is the prefix, ``T`` an encoded task id, ``O`` an encoded owner)::

    P:{t:T}:task        hash    the task record (see log/codec.py)
    P:{t:T}:events      stream  the task's event log
    P:{t:T}:wake        channel pub/sub wake-up for live subscribers
    P:{t:T}:lease       string  which replica has the task's event queue open (TTL)
    P:{t:T}:push        hash    push configs, a field per (owner, config id), and "#seq"
    P:{t:T}:pushstate   hash    push delivery state per config F (an encoded owner:id):
                                "c:F" delivered version, "a:F" attempts, "j:F" its job
    P:{push}:jobs       stream  push delivery jobs, one per (task, config); consumer group
    P:{push}:dead       stream  push dead letters (capped, expiring)
    P:{o:O}:all         zset    the owner's ListTasks index, all tasks
    P:{o:O}:ctx:C       zset    ... filtered by context id C (encoded)
    P:{o:O}:st:S        zset    ... filtered by state S (an integer)
    P:{o:O}:ctxst:C:S   zset    ... filtered by both
    P:{o:O}:expiring    zset    index locators of terminal tasks that have a TTL
    P:{o:O}:pending     zset    (Redis Cluster) writes whose index update is pending
    P:replicas          zset    replica ids holding leases, scored by heartbeat deadline (ms)
    P:{r:R}:tasks       set     ids of the tasks replica R runs (for the orphan reaper)
    P:{r:R}:reaper      string  which replica is ending dead replica R's tasks (TTL)
    P:{r:R}:control     channel control requests to replica R (forwarded cancels), and
                                the replies to the requests R sent

All keys of one task share the Redis Cluster hash tag ``{t:T}`` so that WATCH, MULTI/EXEC
and scripts on a task stay in one slot; all index keys of one owner share ``{o:O}``.

Ids are percent-encoded: every byte of their UTF-8 form outside ``[A-Za-z0-9._-]``
becomes ``%XX``. The encoding is injective, never yields ``{``, ``}``, ``:`` or glob
characters, and so no id can break out of its tag, collide with another id, or reach
another component of a key. Lone surrogates (which a Python ``str`` can carry but a
protobuf string cannot) are encoded as their "surrogatepass" bytes, so they too have keys
of their own.

An id longer than :data:`MAX_ID_BYTES` UTF-8 bytes is refused with
:class:`~a2a_redis.errors.InvalidIdError`: every key that would hold it raises instead.
"""

from __future__ import annotations

import functools
import re

from a2a_redis.connection.cluster import is_cluster
from a2a_redis.errors import InvalidIdError
from a2a_redis.log.codec import utf8

__all__ = ["MAX_ID_BYTES", "Keys", "clear_id_cache", "encode_id"]

#: The longest id (task id, context id, owner, push config id), in UTF-8 bytes. The SDK's
#: SQL store holds ids in 36 characters and owners in 255; 1 KiB leaves room for any real
#: id (UUIDs, URNs, e-mail addresses, DNs) while bounding every key we build (an id is
#: percent-encoded in up to five keys, at most three bytes per byte) and what a hostile
#: caller can make each command carry.
MAX_ID_BYTES = 1024

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_HEX = "0123456789ABCDEF"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9._\-:/]{1,64}$")
_REPLICA_RE = re.compile(r"^[0-9a-f]{1,32}$")


def encode_id(value: str) -> str:
    """Percent-encode ``value`` for use inside a key (injective; safe for tags and globs).

    Raises :class:`~a2a_redis.errors.InvalidIdError` if ``value`` is longer than
    :data:`MAX_ID_BYTES` bytes in UTF-8.
    """
    if len(value) <= _CACHED_LEN:
        return _encode_cached(value)
    return _encode(value)


def _encode(value: str) -> str:
    raw = utf8(value)
    if len(raw) > MAX_ID_BYTES:
        raise InvalidIdError(f"an id of {len(raw)} bytes is over the {MAX_ID_BYTES}-byte limit")
    if all(b in _SAFE for b in raw):
        return raw.decode("ascii")
    out = []
    for b in raw:
        if b in _SAFE:
            out.append(chr(b))
        else:
            out.append("%" + _HEX[b >> 4] + _HEX[b & 15])
    return "".join(out)


_CACHED_LEN = 128  # characters: at most 512 bytes, always under MAX_ID_BYTES
_encode_cached = functools.lru_cache(maxsize=4096)(_encode)


def clear_id_cache() -> None:
    """Empty :func:`encode_id`'s cache of recently encoded ids.

    The cache is bounded (4,096 ids of up to 128 characters), so it is never a leak; but
    its entries are live objects, which a measurement that counts them (the memory tests)
    would take for growth. Encoding works the same with the cache empty.
    """
    _encode_cached.cache_clear()


class Keys:
    """Builds the keys of one a2a-redis namespace.

    Args:
        prefix: The namespace, for example ``"a2a"`` or ``"myapp:a2a"``. It may hold
            letters, digits and ``._-:/``; braces are refused because they would
            become the cluster hash tag.
        sharded: Wake channels are shard channels (``SPUBLISH``/``SSUBSCRIBE``), as on
            Redis Cluster: a wake-up then reaches only the shard that owns the task.
    """

    __slots__ = ("prefix", "publish", "sharded")

    def __init__(self, prefix: str = "a2a", *, sharded: bool = False) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(
                f"invalid key prefix {prefix!r}: use 1-64 characters from [A-Za-z0-9._-:/]"
            )
        self.prefix = prefix
        self.sharded = sharded
        #: The command that publishes on a wake channel: ``SPUBLISH`` or ``PUBLISH``.
        self.publish = "SPUBLISH" if sharded else "PUBLISH"

    @classmethod
    def for_client(cls, redis: object, prefix: str) -> Keys:
        """The key builder for ``prefix`` on this client (shard channels on a cluster)."""
        return cls(prefix, sharded=is_cluster(redis))

    def _encode(self, value: str, what: str, where: str) -> str:
        """``encode_id(value)``; an over-long id raises naming the key (``where``, elided)."""
        try:
            return encode_id(value)
        except InvalidIdError as e:
            raise InvalidIdError(f"{what}: {e}", key=self.prefix + where) from None

    # -- per task ------------------------------------------------------------------------
    def _task_base(self, task_id: str) -> str:
        return f"{self.prefix}:{{t:{self._encode(task_id, 'task id', ':{t:...}')}}}"

    def task(self, task_id: str) -> str:
        """The hash holding the task record."""
        return self._task_base(task_id) + ":task"

    def events(self, task_id: str) -> str:
        """The task's event stream."""
        return self._task_base(task_id) + ":events"

    def lease(self, task_id: str) -> str:
        """The lease a replica holds while the task's event queue is open there."""
        return self._task_base(task_id) + ":lease"

    def push_configs(self, task_id: str) -> str:
        """The hash of the task's push-notification configs (field per owner and config id)."""
        return self._task_base(task_id) + ":push"

    def push_state(self, task_id: str) -> str:
        """The task's push delivery state: per config, cursor, attempts and job."""
        return self._task_base(task_id) + ":pushstate"

    @property
    def push_jobs(self) -> str:
        """The stream of push delivery jobs (one per task and config), read by a group."""
        return f"{self.prefix}:{{push}}:jobs"

    @property
    def push_dead(self) -> str:
        """The stream of push notifications that could not be delivered (dead letters)."""
        return f"{self.prefix}:{{push}}:dead"

    def wake(self, task_id: str) -> str:
        """The pub/sub channel that wakes live subscribers of the task."""
        return self._task_base(task_id) + ":wake"

    # -- per owner -----------------------------------------------------------------------
    def _owner_base(self, owner: str) -> str:
        return f"{self.prefix}:{{o:{self._encode(owner, 'owner', ':{o:...}')}}}"

    def index(self, owner: str, context_id: str = "", state: int = 0) -> str:
        """The owner's ListTasks index for an optional context id and state filter.

        An empty ``context_id`` and a zero ``state`` mean "no filter", as in the SDK.
        """
        base = self._owner_base(owner)
        if context_id:
            where = base[len(self.prefix) :] + ":ctx:..."
            context = self._encode(context_id, "context id", where)
        if context_id and state:
            return f"{base}:ctxst:{context}:{state}"
        if context_id:
            return f"{base}:ctx:{context}"
        if state:
            return f"{base}:st:{state}"
        return f"{base}:all"

    def indexes(self, owner: str, context_id: str, state: int) -> tuple[str, ...]:
        """Every index a task with this context id and state belongs to."""
        keys = [self.index(owner)]
        if context_id:
            keys.append(self.index(owner, context_id=context_id))
        if state:
            keys.append(self.index(owner, state=state))
        if context_id and state:
            keys.append(self.index(owner, context_id=context_id, state=state))
        return tuple(keys)

    def expiring(self, owner: str) -> str:
        """The owner's zset of terminal tasks that will expire, scored by expiry (ms)."""
        return self._owner_base(owner) + ":expiring"

    def pending(self, owner: str) -> str:
        """Redis Cluster only: the owner's zset of writes whose index update is pending."""
        return self._owner_base(owner) + ":pending"

    # -- replicas (R: a replica id, lower-case hex) ----------------------------------------
    @property
    def replicas(self) -> str:
        """The zset of replicas that hold leases, scored by their heartbeat deadline (ms)."""
        return f"{self.prefix}:replicas"

    def _replica_base(self, replica: str) -> str:
        if not _REPLICA_RE.match(replica):
            raise InvalidIdError(
                f"replica id {replica!r}: use 1-32 lower-case hex digits",
                key=f"{self.prefix}:{{r:...}}",
            )
        return f"{self.prefix}:{{r:{replica}}}"

    def replica_tasks(self, replica: str) -> str:
        """The set of the ids of the tasks ``replica`` runs."""
        return self._replica_base(replica) + ":tasks"

    def reaper(self, replica: str) -> str:
        """Which live replica is ending dead ``replica``'s tasks (a short-lived claim)."""
        return self._replica_base(replica) + ":reaper"

    def control(self, replica: str) -> str:
        """The channel of control requests to ``replica`` (and of replies to its requests)."""
        return self._replica_base(replica) + ":control"

    # -- admin ---------------------------------------------------------------------------
    def scan_pattern(self) -> str:
        """A SCAN MATCH pattern covering every key of this namespace (admin use only)."""
        escaped = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix)
        return escaped + ":*"
