"""a2a-redis: a Redis task store and event bus for multi-replica A2A agent servers."""

from a2a_redis import telemetry
from a2a_redis.backend import RedisBackend
from a2a_redis.connection.durability import Durability
from a2a_redis.errors import (
    A2ARedisError,
    ContentionError,
    CorruptDataError,
    DecryptionError,
    InvalidIdError,
    ListenerClosedError,
    OwnerLostError,
    PayloadTooLargeError,
    PoolExhaustedError,
    RedisUnavailableError,
    ReplicationTimeoutError,
    SubscriberLagError,
    TaskOwnedElsewhereError,
    TerminalStateError,
    UnsupportedSchemaError,
)
from a2a_redis.events.event_stream import RedisTaskEventStream
from a2a_redis.events.listener import StreamListener
from a2a_redis.events.queue_manager import RedisQueueManager
from a2a_redis.log.event_log import StreamRetention
from a2a_redis.log.keys import Keys
from a2a_redis.options import Options
from a2a_redis.stores.push_config_store import RedisPushNotificationConfigStore
from a2a_redis.stores.task_store import RedisTaskStore, VersionedRedisTaskStore
from a2a_redis.version import __version__

telemetry.instrument_logging()  # our records carry trace ids (a2a_redis/telemetry.py)

__all__ = [
    "A2ARedisError",
    "ContentionError",
    "CorruptDataError",
    "DecryptionError",
    "Durability",
    "InvalidIdError",
    "Keys",
    "ListenerClosedError",
    "Options",
    "OwnerLostError",
    "PayloadTooLargeError",
    "PoolExhaustedError",
    "RedisBackend",
    "RedisPushNotificationConfigStore",
    "RedisQueueManager",
    "RedisTaskEventStream",
    "RedisTaskStore",
    "RedisUnavailableError",
    "ReplicationTimeoutError",
    "StreamListener",
    "StreamRetention",
    "SubscriberLagError",
    "TaskOwnedElsewhereError",
    "TerminalStateError",
    "UnsupportedSchemaError",
    "VersionedRedisTaskStore",
    "__version__",
]
