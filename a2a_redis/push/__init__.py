"""Push notifications delivered from Redis: the sender, its policies and dead letters."""

from a2a_redis.push.policy import NOTIFICATION_ID_HEADER, RetryPolicy, default_url_validator
from a2a_redis.push.sender import RedisPushNotificationSender

__all__ = [
    "NOTIFICATION_ID_HEADER",
    "RedisPushNotificationSender",
    "RetryPolicy",
    "default_url_validator",
]
