"""What push delivery decides without Redis: URL policy, retry policy, headers, ids.

* **URL policy.** :func:`default_url_validator` refuses URLs that are not http(s), have no
  host, or whose host resolves to a loopback, link-local (169.254.169.254, the cloud
  metadata address, among them), unspecified or multicast address, unless the host is in
  ``allow_hosts``. A host that does not resolve is refused (fail closed). The SDK's
  ``validate_push_notification_url`` is stricter (private ranges too) and can be passed
  instead, as can any ``async (url) -> bool``.
* **Retries.** :class:`RetryPolicy`: exponential backoff with full jitter, on a connection
  error, a timeout, a 5xx, a 408 or a 429 (whose ``Retry-After`` is honoured), up to
  ``max_attempts`` within ``max_age`` of the first attempt. Any other 4xx is final.
* **Ids.** :func:`notification_id` names one (task, version, config): the same on every
  attempt and every replica, so a receiver can drop duplicates.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import random
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from a2a.types.a2a_pb2 import TaskPushNotificationConfig

__all__ = [
    "NOTIFICATION_ID_HEADER",
    "RetryPolicy",
    "UrlValidator",
    "default_url_validator",
    "headers_for",
    "notification_id",
    "retry_after_seconds",
]

logger = logging.getLogger(__name__)

#: The idempotency header: stable across retries and replicas for one (task, version, config).
NOTIFICATION_ID_HEADER = "X-A2A-Notification-Id"

UrlValidator = Callable[[str], Awaitable[bool]]

#: Statuses worth another attempt (besides connection errors and timeouts, and every 5xx).
_RETRY_STATUSES = frozenset({408, 429})


def _refused_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast


def default_url_validator(allow_hosts: Collection[str] = ()) -> UrlValidator:
    """The default URL policy (see the module docstring); ``allow_hosts`` pass unresolved.

    Host names in ``allow_hosts`` compare case-insensitively (``"127.0.0.1"``,
    ``"localhost"``, ``"::1"``); the tests allow their loopback receiver this way.
    """
    allowed = frozenset(h.lower().strip("[]") for h in allow_hosts)

    async def validate(url: str) -> bool:
        try:
            parsed = urllib.parse.urlsplit(url)
            port = parsed.port
        except ValueError:
            return False
        host = (parsed.hostname or "").lower()
        if parsed.scheme not in ("http", "https") or not host:
            return False
        if host in allowed:
            return True
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port or (443 if parsed.scheme == "https" else 80), type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError):
            return False
        addresses = {str(info[4][0]) for info in infos}
        return bool(addresses) and not any(_refused_address(a) for a in addresses)

    return validate


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try a notification again, and after how long.

    Attributes:
        max_attempts: Attempts per notification, the first included (default 10).
        max_age: Seconds after the first attempt past which no attempt starts (1 h).
        base_delay: Backoff before the second attempt is drawn from [0, base_delay];
            the bound doubles per attempt (full jitter) up to ``max_delay``.
        max_delay: The largest backoff bound, and the largest ``Retry-After`` honoured.
    """

    max_attempts: int = 10
    max_age: float = 3600.0
    base_delay: float = 1.0
    max_delay: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not (self.max_age > 0 and self.base_delay > 0 and self.max_delay >= self.base_delay):
            raise ValueError("max_age and base_delay must be positive, max_delay >= base_delay")

    @staticmethod
    def retryable(status: int | None) -> bool:
        """Whether an outcome deserves another attempt (None: no response at all)."""
        return status is None or status >= 500 or status in _RETRY_STATUSES

    def delay(self, attempts: int, retry_after: float | None) -> float:
        """Seconds to wait after ``attempts`` failed attempts (full jitter, or Retry-After)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay)
        bound = min(self.max_delay, self.base_delay * 2 ** max(attempts - 1, 0))
        return random.uniform(0, bound)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header as seconds from now (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def notification_id(task_id: str, version: int, config_field: bytes) -> str:
    """The idempotency id of one (task, version, config): 32 hex digits.

    ``config_field`` is the config's hash field (encoded owner and config id), so configs
    of the same id under two owners differ. It reveals neither.
    """
    digest = hashlib.sha256()
    for part in (task_id.encode("utf-8", "surrogatepass"), b"%d" % version, config_field):
        digest.update(b"%d:" % len(part) + part)
    return digest.hexdigest()[:32]


def headers_for(config: TaskPushNotificationConfig, nid: str) -> dict[str, str]:
    """The SDK's headers (token, Authorization) plus the idempotency id."""
    headers = {NOTIFICATION_ID_HEADER: nid}
    if config.token:
        headers["X-A2A-Notification-Token"] = config.token
    if config.HasField("authentication"):
        auth = config.authentication
        if auth.scheme and auth.credentials:
            headers["Authorization"] = f"{auth.scheme} {auth.credentials}"
    return headers
