"""One exception hierarchy for a2a-redis, and the one place that translates redis-py errors.

Every error raised by this package derives from :class:`A2ARedisError` and names the Redis
key it concerns, except the SDK's own ``ConcurrentTaskModificationError``, which the
versioned store raises on a version conflict exactly as the SDK's SQL store does.
:class:`TerminalStateError` is both: ours, and a ``ConcurrentTaskModificationError``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from a2a.server.cluster.task_store import ConcurrentTaskModificationError
from a2a.types.a2a_pb2 import TaskState
from a2a.utils.errors import InvalidParamsError
from redis import exceptions as rex

__all__ = [
    "A2ARedisError",
    "ContentionError",
    "CorruptDataError",
    "DecryptionError",
    "InvalidIdError",
    "ListenerClosedError",
    "OwnerLostError",
    "PayloadTooLargeError",
    "PoolExhaustedError",
    "RedisUnavailableError",
    "ReplicationTimeoutError",
    "SubscriberLagError",
    "TaskOwnedElsewhereError",
    "TerminalStateError",
    "TooManyPushConfigsError",
    "UnsupportedSchemaError",
    "raise_if_pool_exhausted",
    "redis_errors",
    "require_binary_client",
]


class A2ARedisError(Exception):
    """Base class of every error raised by a2a-redis."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message if key is None else f"{message} (key {key!r})")
        self.key = key
        self.reason = message


class RedisUnavailableError(A2ARedisError):
    """Redis could not be reached, or did not answer in time.

    Raised instead of "not found": an outage is never reported as a missing task.
    """


class PoolExhaustedError(A2ARedisError):
    """The client's connection pool has no free connection (redis-py's ``max_connections``).

    The server is fine: the process has more concurrent operations than connections. Use a
    ``BlockingConnectionPool`` (``RedisBackend.from_url`` does) or raise ``max_connections``.
    """


class CorruptDataError(A2ARedisError):
    """Bytes under one of our keys cannot be decoded, or the key holds the wrong type."""


class DecryptionError(CorruptDataError):
    """An encrypted push config could not be decrypted.

    The store's ``encryption_key`` is wrong, the ciphertext was altered in Redis, or the
    record is encrypted and the store has no key.
    """


class UnsupportedSchemaError(CorruptDataError):
    """A record carries a schema version this release cannot read (written by a newer one)."""


class TaskOwnedElsewhereError(A2ARedisError):
    """A plain ``TaskStore.save`` named a task id that another owner already holds.

    Task ids are unique per prefix (the SDK's runtime keys its registries and event streams
    by task id alone), so the write is refused instead of overwriting the other owner's task.
    """


class TerminalStateError(A2ARedisError, ConcurrentTaskModificationError):
    """A save would move a task out of its terminal state; nothing was written.

    In A2A a task that is COMPLETED, CANCELED, FAILED or REJECTED is final: it cannot be
    restarted (a follow-up needs a new task). Both stores refuse a save that would change a
    stored terminal state to any other state; rewriting the same terminal state (say, a
    COMPLETED task saved again with its last artifact) is allowed.

    It is also the SDK's ``ConcurrentTaskModificationError``, so the SDK's cluster-mode
    consumer treats it as a conflict: it reloads the task, finds it terminal (for example
    canceled from another replica) and stops its producer. ``task_id`` is the SDK's
    attribute; ``stored_state`` and ``refused_state`` are ``TaskState`` numbers.
    """

    def __init__(
        self, task_id: str, *, key: str | None, stored_state: int, refused_state: int
    ) -> None:
        reason = (
            f"task {task_id!r} is {_state_name(stored_state)}, a terminal state: the save "
            f"that would make it {_state_name(refused_state)} was refused (a task in a "
            "terminal state cannot be restarted; send a follow-up as a new task)"
        )
        # A2ARedisError.__init__ passes its text up the MRO, which here reaches the SDK
        # class (whose one argument is the task id): so each base is initialised by name.
        ConcurrentTaskModificationError.__init__(self, task_id)
        Exception.__init__(self, reason if key is None else f"{reason} (key {key!r})")
        self.key = key
        self.reason = reason
        self.stored_state = stored_state
        self.refused_state = refused_state


def _state_name(state: int) -> str:
    try:
        return TaskState.Name(state)
    except ValueError:  # protobuf keeps enum numbers it does not know
        return f"state {state}"


class ReplicationTimeoutError(A2ARedisError):
    """A write was applied on the primary, but too few replicas confirmed it in time.

    Raised when a :class:`~a2a_redis.Durability` asks for ``WAIT``: the write is NOT rolled
    back (it is visible, and stays unless the primary fails before replicating it); it is
    just not known to be on ``required`` replicas (``acked`` confirmed it).
    """

    def __init__(self, message: str, *, key: str | None, acked: int, required: int) -> None:
        super().__init__(message, key=key)
        self.acked = acked
        self.required = required


class ContentionError(A2ARedisError):
    """An unconditional write lost its optimistic transaction too many times in a row."""


class InvalidIdError(A2ARedisError, ValueError):
    """An id (task, context, owner, push config) that cannot name a key or a record.

    Raised for an id longer than ``keys.MAX_ID_BYTES`` UTF-8 bytes, and for a task id that
    is not valid UTF-8 where it must go into a protobuf string. ``key`` names the key it
    would have built, its id elided.
    """


class PayloadTooLargeError(A2ARedisError, ValueError):
    """An encoded payload (a Task, an event, a push config) is over ``max_payload_bytes``.

    Nothing was written. ``size`` and ``limit`` are in bytes.
    """

    def __init__(self, message: str, *, key: str | None = None, size: int, limit: int) -> None:
        super().__init__(message, key=key)
        self.size = size
        self.limit = limit


class TooManyPushConfigsError(A2ARedisError, InvalidParamsError):
    """A task already has ``max_configs_per_task`` push configs; nothing was written.

    It is also the SDK's ``InvalidParamsError``, so the SDK's handlers answer the request
    with an A2A invalid-params error. ``limit`` is the configured maximum.
    """

    def __init__(self, message: str, *, key: str | None, limit: int) -> None:
        text = message if key is None else f"{message} (key {key!r})"
        InvalidParamsError.__init__(self, text)
        self.key = key
        self.reason = message
        self.limit = limit


class SubscriberLagError(A2ARedisError):
    """A subscriber fell behind further than the task's stream retains (``MAXLEN``)."""


class ListenerClosedError(A2ARedisError):
    """The listener (its backend) was closed while a subscriber was waiting."""


class OwnerLostError(A2ARedisError):
    """Nothing (no entry, no heartbeat) came from a task's queue owner for too long."""


def raise_if_pool_exhausted(error: Exception, operation: str = "", key: str | None = None) -> None:
    """Raise :class:`PoolExhaustedError` if ``error`` is the pool's, not the server's.

    redis-py raises ``MaxConnectionsError`` from a plain pool, and from a
    ``BlockingConnectionPool`` that waited ``timeout`` seconds a ``ConnectionError`` whose
    text is "No connection available." (its only signal of this condition).
    """
    if isinstance(error, rex.MaxConnectionsError) or str(error) == "No connection available.":
        raise PoolExhaustedError(
            f"{operation or 'Redis call'}: the connection pool is exhausted", key=key
        ) from error


def require_binary_client(redis: object) -> None:
    """Refuse a client that decodes responses: we store binary protobuf and msgpack."""
    get_encoder = getattr(redis, "get_encoder", None)  # Redis and RedisCluster alike
    if get_encoder is not None and getattr(get_encoder(), "decode_responses", False):
        raise ValueError(
            "a2a-redis needs a client with decode_responses=False: it stores binary protobuf"
        )


@contextmanager
def redis_errors(operation: str, key: str, *, connection: bool = True) -> Iterator[None]:
    """Translate redis-py exceptions raised inside the block into our typed errors.

    Connection loss and timeouts become :class:`RedisUnavailableError` (unless
    ``connection`` is False, for callers that retry them); a WRONGTYPE reply becomes
    :class:`CorruptDataError`. Other server errors propagate unchanged.
    """
    try:
        yield
    except (rex.ConnectionError, rex.TimeoutError) as e:
        raise_if_pool_exhausted(e, operation, key)
        if not connection:
            raise
        raise RedisUnavailableError(f"Redis unavailable during {operation}: {e}", key=key) from e
    except (rex.ClusterDownError, rex.TryAgainError, rex.RedisClusterException) as e:
        # A cluster that lost a shard, is failing over, or cannot be reached at all.
        raise RedisUnavailableError(
            f"Redis Cluster unavailable during {operation}: {e}", key=key
        ) from e
    except rex.ResponseError as e:
        if str(e).startswith("WRONGTYPE"):
            # Our batch script names the key ("WRONGTYPE <key> holds a ..."); Redis does not.
            named = _NAMED_WRONGTYPE.match(str(e))
            raise CorruptDataError(
                f"{operation}: a key holds the wrong Redis type ({e})",
                key=named.group(1) if named else key,
            ) from e
        raise


_NAMED_WRONGTYPE = re.compile(r"WRONGTYPE (\S+) holds a ")
