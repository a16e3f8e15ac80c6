"""``RedisPushNotificationConfigStore``: the SDK's ``PushNotificationConfigStore`` on Redis.

Storage: one hash per task (``keys.push_configs``, in the task's cluster hash tag), with
one field per (owner, config id) and one counter field::

    O:I   one config     O = encode_id(owner), I = encode_id(config id); encode_id escapes
                         ":", so no two (owner, config id) pairs share a field
    #seq  write counter  decimal integer; "#" never occurs in an encoded id

Each config field holds a msgpack array ``[schema, seq, owner, sealed, payload]``:

* ``schema`` -- :data:`SCHEMA_VERSION` (a newer one raises ``UnsupportedSchemaError``);
* ``seq`` -- the hash's write counter at this config's last ``set_info``, assigned by the
  server inside the write, so configs list in the order they were last set;
* ``owner`` -- the owner's UTF-8 bytes (also encoded in the field name);
* ``sealed`` -- False: ``payload`` is the ``TaskPushNotificationConfig`` protobuf bytes;
  True: ``payload`` is a Fernet token whose plaintext is the msgpack array
  ``[owner, config protobuf bytes]``.

With an ``encryption_key`` the WHOLE config is encrypted (url, token, authentication and
its credentials). The owner and config id stay readable, in the field name and envelope:
they are identifiers, not secrets, and Redis needs them to scope reads and deletes without
the key. Fernet authenticates the ciphertext, and the owner inside it, the task id and the
config id inside the protobuf are checked against where the record lies, so a ciphertext
copied to another owner's field or another task is refused as corrupt rather than served.

Reading with and without a key (compare the SDK's ``DatabasePushNotificationConfigStore``):

* a sealed record and a wrong key, or a ciphertext altered in Redis: :class:`DecryptionError`
  naming the key (the SQL store falls back to parsing the bytes as plaintext; there is
  no such fallback here: the envelope says which it is, so a wrong key is never masked);
* a sealed record and no key configured: :class:`DecryptionError`;
* a plaintext record and a key configured: read as is (as the SQL store does), so that
  encryption can be switched on over existing data; the next ``set_info`` of that config
  stores it encrypted.

Retention: push configs belong to their task and, like tasks, have no TTL by default;
deleting the task should delete the hash too. ``ttl`` (seconds) sets one on the whole
hash, renewed by every ``set_info``. The hash is removed when its last config is deleted.

Order: ``get_info`` lists the caller's configs in the order they were last set (setting an
existing id moves it last), exactly as the SDK's ``InMemoryPushNotificationConfigStore``.
``get_info_for_dispatch`` lists every owner's configs in that same last-set order (the
in-memory store groups them by owner first).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import msgpack  # type: ignore[import-untyped,unused-ignore]
from a2a.server.context import ServerCallContext
from a2a.server.owner_resolver import OwnerResolver, resolve_user_scope
from a2a.server.tasks.push_notification_config_store import (
    PushNotificationConfigStore,
    normalize_push_notification_config,
)
from a2a.types.a2a_pb2 import TaskPushNotificationConfig
from google.protobuf.message import DecodeError
from redis import exceptions as rex

from a2a_redis.connection.cluster import Client
from a2a_redis.connection.durability import Durability, run_script
from a2a_redis.errors import (
    CorruptDataError,
    DecryptionError,
    InvalidIdError,
    TooManyPushConfigsError,
    redis_errors,
    require_binary_client,
)
from a2a_redis.log.codec import (
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    check_payload_size,
    check_schema,
    decode_text,
    utf8,
)
from a2a_redis.log.keys import Keys, encode_id
from a2a_redis.options import Options
from a2a_redis.stores.push_scripts import DELETE as _DELETE
from a2a_redis.stores.push_scripts import SET as _SET

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

__all__ = [
    "DEFAULT_MAX_CONFIGS_PER_TASK",
    "SCHEMA_VERSION",
    "DecryptionError",
    "RedisPushNotificationConfigStore",
]

#: The most push configs per task (a2a-java's limit): each costs an HTTP request per event.
DEFAULT_MAX_CONFIGS_PER_TASK = 100
#: Cap of the delivery-job stream (``MAXLEN ~``): a guard; jobs are deleted when done.
JOBS_MAXLEN = 1_000_000

logger = logging.getLogger(__name__)

_SEQ = b"#seq"
_CORRUPT = "A2A_CORRUPT"


def _field(key: str, owner: str, config_id: str) -> bytes:
    return utf8(_owner_prefix(key, owner) + _encode(key, "config id", config_id))


def _owner_prefix(key: str, owner: str) -> str:
    return _encode(key, "owner", owner) + ":"


def _encode(key: str, what: str, value: str) -> str:
    """``encode_id(value)``; an over-long id raises naming the hash it would go into."""
    try:
        return encode_id(value)
    except InvalidIdError as e:
        raise InvalidIdError(f"{what}: {e}", key=key) from None


class RedisPushNotificationConfigStore(PushNotificationConfigStore):
    """Push-notification configs on Redis, scoped to their owner, optionally encrypted.

    See the module docstring for the storage format, encryption, order and retention.

    Args:
        redis: A ``redis.asyncio.Redis`` with ``decode_responses=False``. The store does not
            own it and never closes it.
        prefix: Key namespace (default ``"a2a"``), shared with the task store.
        owner_resolver: Maps a call context to its owner (default: the user name).
        encryption_key: A Fernet key (URL-safe base64 of 32 bytes, as for the SDK's SQL
            store); when given, every config is stored encrypted. Needs ``cryptography``
            (the ``encryption`` extra). None (the default) stores protobuf bytes in clear.
        ttl: Seconds to keep a task's configs after its last ``set_info``; None (the
            default) keeps them until deleted, like the task they belong to.
        durability: Replicas that must confirm each write (``WAIT``); None waits for none.
        max_payload_bytes: Largest encoded config ``set_info`` accepts (default 8 MiB); a
            larger one raises ``PayloadTooLargeError``.
        max_configs_per_task: The most configs one task may have, all owners together
            (default 100; 0: no limit). One more raises ``TooManyPushConfigsError`` (the
            SDK's ``InvalidParamsError``); replacing an existing config is always allowed.

    With :meth:`record_deliveries` switched on (``RedisPushNotificationSender`` does it),
    ``set_info`` also adds a delivery job for the (task, config) to ``keys.push_jobs``.
    """

    _on_use: Callable[[], None] | None

    def __init__(
        self,
        redis: Client,
        *,
        prefix: str = "a2a",
        owner_resolver: OwnerResolver = resolve_user_scope,
        encryption_key: bytes | str | None = None,
        ttl: float | None = None,
        durability: Durability | None = None,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        max_configs_per_task: int = DEFAULT_MAX_CONFIGS_PER_TASK,
    ) -> None:
        options = Options(
            prefix=prefix,
            owner_resolver=owner_resolver,
            durability=durability,
            max_payload_bytes=max_payload_bytes,
        )
        self._setup(redis, options, encryption_key=encryption_key, ttl=ttl)
        self.set_max_configs(max_configs_per_task)

    @classmethod
    def from_options(
        cls,
        redis: Client,
        options: Options,
        *,
        encryption_key: bytes | str | None = None,
        ttl: float | None = None,
    ) -> RedisPushNotificationConfigStore:
        """A store over ``redis`` with the backend's shared ``options``."""
        store = cls.__new__(cls)
        store._setup(redis, options, encryption_key=encryption_key, ttl=ttl)
        return store

    def set_max_configs(self, limit: int) -> None:
        """Allow at most ``limit`` configs per task (0: no limit)."""
        if limit < 0:
            raise ValueError("max_configs_per_task must be 0 (no limit) or positive")
        self.max_configs_per_task = limit

    def record_deliveries(
        self, enabled: bool = True, on_use: Callable[[], None] | None = None
    ) -> None:
        """Add a delivery job to ``keys.push_jobs`` at every ``set_info`` (or stop).

        ``on_use`` is called at every ``set_info`` (the sender starts its workers).
        """
        self._jobs = enabled
        self._on_use = on_use

    def _setup(
        self,
        redis: Client,
        options: Options,
        *,
        encryption_key: bytes | str | None,
        ttl: float | None,
    ) -> None:
        require_binary_client(redis)
        if ttl is not None and not ttl > 0:
            raise ValueError("ttl must be positive seconds, or None to keep configs")
        self.redis = redis
        self.keys = Keys.for_client(redis, options.prefix)
        self.owner_resolver = options.owner_resolver
        self._max_bytes = options.max_payload_bytes
        self._ttl_ms = b"0" if ttl is None else b"%d" % max(1, round(ttl * 1000))
        self._fernet: Fernet | None = None
        if encryption_key is not None:
            try:
                from cryptography.fernet import Fernet
            except ImportError as e:  # pragma: no cover - depends on the installation
                raise ImportError(
                    "encrypted push configs need the 'cryptography' package: "
                    "pip install 'a2a-redis[encryption]'"
                ) from e
            key = encryption_key.encode() if isinstance(encryption_key, str) else encryption_key
            self._fernet = Fernet(key)  # ValueError for a malformed key
        self._set = redis.register_script(_SET)
        self._delete = redis.register_script(_DELETE)
        self._durability = options.durability
        self.max_configs_per_task = DEFAULT_MAX_CONFIGS_PER_TASK
        self._jobs = False
        self._on_use = None

    # -- PushNotificationConfigStore ---------------------------------------------------------
    async def set_info(
        self,
        task_id: str,
        notification_config: TaskPushNotificationConfig,
        context: ServerCallContext,
    ) -> TaskPushNotificationConfig:
        """Store a normalized copy for the caller (replacing their config of that id).

        The argument is not mutated; the normalized copy (task id set, an empty id
        defaulted to the task id) is returned. One round trip (EVALSHA: limit check,
        counter, HSET and, with a ``ttl``, PEXPIRE, atomically), and one more (XADD of the
        delivery job) when deliveries are recorded; the first call on a server that has not
        loaded the script yet adds two (NOSCRIPT, SCRIPT LOAD).

        Raises ``TooManyPushConfigsError`` when the task has ``max_configs_per_task``
        configs already and this one is new.
        """
        owner = self.owner_resolver(context)
        key = self.keys.push_configs(task_id)
        if not task_id.isascii():
            try:  # a lone surrogate: a Python str carries it, a protobuf string cannot
                task_id.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidIdError("task id is not valid UTF-8", key=key) from None
        config = normalize_push_notification_config(task_id, notification_config)
        owner_raw = utf8(owner)
        data = config.SerializeToString()
        check_payload_size(key, "push config", len(data), self._max_bytes)
        field = _field(key, owner, config.id)
        if self._fernet is not None:
            payload = self._fernet.encrypt(msgpack.packb([owner_raw, data]))
        else:
            payload = data
        head = b"\x95" + msgpack.packb(SCHEMA_VERSION)
        tail = b"".join(msgpack.packb(v) for v in (owner_raw, self._fernet is not None, payload))
        try:
            with redis_errors("set push config", key):
                args = [field, head, tail, self._ttl_ms, b"%d" % self.max_configs_per_task]
                await run_script(self.redis, self._set, [key], args, self._durability, key)
        except rex.ResponseError as e:
            if str(e).startswith("A2A_TOOMANY"):
                raise TooManyPushConfigsError(
                    f"task {task_id!r} has {self.max_configs_per_task} push configs already",
                    key=key,
                    limit=self.max_configs_per_task,
                ) from e
            if str(e).startswith(_CORRUPT):
                raise CorruptDataError(f"set push config: {str(e)[12:]}", key=key) from e
            raise
        if self._on_use is not None:
            self._on_use()
        if self._jobs:
            with redis_errors("add push delivery job", self.keys.push_jobs):
                await self.redis.xadd(
                    self.keys.push_jobs,
                    {b"t": utf8(task_id), b"f": field},
                    maxlen=JOBS_MAXLEN,
                    approximate=True,
                )
        logger.debug(
            "push config %r of task %r saved for owner %r (%s)",
            config.id,
            task_id,
            owner,
            "encrypted" if self._fernet is not None else "clear",
        )
        return config

    async def get_info(
        self, task_id: str, context: ServerCallContext
    ) -> list[TaskPushNotificationConfig]:
        """The caller's configs for the task, in the order they were last set.

        One round trip (HGETALL). Another owner's undecodable record does not affect it.
        """
        key = self.keys.push_configs(task_id)
        return await self._read(task_id, utf8(_owner_prefix(key, self.owner_resolver(context))))

    async def get_info_for_dispatch(self, task_id: str) -> list[TaskPushNotificationConfig]:
        """Every owner's configs for the task, in the order they were last set.

        One round trip (HGETALL). Any undecodable record raises (nothing is dropped
        silently): :class:`~a2a_redis.errors.CorruptDataError` or :class:`DecryptionError`.
        """
        return await self._read(task_id, b"")

    async def delete_info(
        self,
        task_id: str,
        context: ServerCallContext,
        config_id: str | None = None,
    ) -> None:
        """Delete the caller's config ``config_id``, or all of the caller's configs.

        Other owners' configs are untouched; deleting what does not exist is a no-op.
        One round trip (EVALSHA: HDEL, or HKEYS and HDEL of the caller's fields).
        """
        owner = self.owner_resolver(context)
        key = self.keys.push_configs(task_id)
        if config_id is None:
            args = [b"owner", utf8(_owner_prefix(key, owner))]
        else:
            args = [b"one", _field(key, owner, config_id)]
        with redis_errors("delete push config", key):
            deleted = await run_script(self.redis, self._delete, [key], args, self._durability, key)
        logger.debug(
            "deleted %s push config(s) (%r) of task %r for owner %r",
            deleted,
            "all" if config_id is None else config_id,
            task_id,
            owner,
        )

    async def config_at(self, task_id: str, field: bytes) -> TaskPushNotificationConfig | None:
        """The config in hash field ``field`` (``owner:id``, encoded), or None if gone.

        One round trip (HGET), for the delivery workers.
        """
        key = self.keys.push_configs(task_id)
        with redis_errors("get push config", key):
            value = await self.redis.hget(key, field)
        if value is None:
            return None
        return self._decode(key, task_id, field, cast("bytes", value))[1]

    # -- decoding ----------------------------------------------------------------------------
    async def _read(self, task_id: str, field_prefix: bytes) -> list[TaskPushNotificationConfig]:
        key = self.keys.push_configs(task_id)
        with redis_errors("get push configs", key):
            rows = cast("dict[bytes, bytes]", await self.redis.hgetall(key))
        found: list[tuple[int, TaskPushNotificationConfig]] = []
        for field, value in rows.items():
            if field == _SEQ or not field.startswith(field_prefix):
                continue
            found.append(self._decode(key, task_id, field, value))
        found.sort(key=lambda item: item[0])
        return [config for _, config in found]

    def _decode(
        self, key: str, task_id: str, field: bytes, value: bytes
    ) -> tuple[int, TaskPushNotificationConfig]:
        """Decode one field into ``(seq, config)``, checking it against where it lies."""
        owner_part, sep, id_part = field.partition(b":")
        if not sep:
            raise CorruptDataError(f"push config field {field!r} is malformed", key=key)
        try:
            envelope: Any = msgpack.unpackb(value)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise CorruptDataError(f"push config {field!r} is not an envelope: {e}", key=key) from e
        if not isinstance(envelope, list) or not envelope:
            raise CorruptDataError(f"push config {field!r} is not an envelope", key=key)
        check_schema(key, envelope[0], f"push config {field!r}")
        if len(envelope) != 5:
            raise CorruptDataError(f"push config {field!r} is not an envelope", key=key)
        _, seq, owner_raw, sealed, payload = envelope
        if not (
            isinstance(seq, int)
            and isinstance(owner_raw, bytes)
            and isinstance(sealed, bool)
            and isinstance(payload, bytes)
        ):
            raise CorruptDataError(f"push config {field!r} has malformed fields", key=key)
        owner = decode_text(key, f"push config {field!r} owner", owner_raw)
        if utf8(_encode(key, "owner", owner)) != owner_part:
            raise CorruptDataError(f"push config {field!r} names another owner", key=key)
        data = self._open(key, field, owner_raw, payload) if sealed else payload
        try:
            config = TaskPushNotificationConfig.FromString(data)
        except (DecodeError, RuntimeWarning) as e:
            raise CorruptDataError(f"push config {field!r} is not a valid config", key=key) from e
        if config.task_id != task_id or utf8(_encode(key, "config id", config.id)) != id_part:
            raise CorruptDataError(
                f"push config {field!r} belongs to another task or config id", key=key
            )
        return seq, config

    def _open(self, key: str, field: bytes, owner_raw: bytes, token: bytes) -> bytes:
        """Decrypt a sealed payload and check the owner sealed inside it."""
        if self._fernet is None:
            raise DecryptionError(
                f"push config {field!r} is encrypted and this store has no encryption_key",
                key=key,
            )
        from cryptography.fernet import InvalidToken

        try:
            plain = self._fernet.decrypt(token)
        except InvalidToken as e:
            raise DecryptionError(
                f"cannot decrypt push config {field!r}: wrong encryption_key, "
                "or the ciphertext was altered",
                key=key,
            ) from e
        try:
            inner_owner, data = msgpack.unpackb(plain)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise CorruptDataError(f"push config {field!r}: bad sealed content", key=key) from e
        if inner_owner != owner_raw or not isinstance(data, bytes):
            raise CorruptDataError(f"push config {field!r} was sealed for another owner", key=key)
        return data
