"""``a2a_redis.push.policy``: retry decisions, Retry-After, ids, headers, URL policy."""

from __future__ import annotations

from datetime import datetime, timezone
from email.utils import format_datetime

import pytest
from a2a.types.a2a_pb2 import AuthenticationInfo, TaskPushNotificationConfig

from a2a_redis.push.policy import (
    RetryPolicy,
    default_url_validator,
    headers_for,
    notification_id,
    retry_after_seconds,
)


def test_which_outcomes_are_retried() -> None:
    retryable = RetryPolicy.retryable
    assert retryable(None) and retryable(500) and retryable(503) and retryable(408)
    assert retryable(429)
    assert not any(retryable(s) for s in (301, 400, 401, 403, 404, 410, 422))


def test_backoff_is_full_jitter_within_bounds_and_honours_retry_after() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    for attempts in range(1, 10):
        bound = min(8.0, 2 ** (attempts - 1))
        assert all(0 <= policy.delay(attempts, None) <= bound for _ in range(50))
    assert policy.delay(3, 5.0) == 5.0
    assert policy.delay(3, 100.0) == 8.0  # capped
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_retry_after_as_seconds_or_http_date() -> None:
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    when = datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert retry_after_seconds(format_datetime(when, usegmt=True), now=when.timestamp() - 30) == 30


def test_notification_ids_are_stable_and_distinct() -> None:
    a = notification_id("t", 3, b"alice:hook")
    assert a == notification_id("t", 3, b"alice:hook") and len(a) == 32
    assert len({a, notification_id("t", 4, b"alice:hook"), notification_id("t", 3, b"bob:hook"),
                notification_id("t3", 3, b"alice:hook")}) == 4  # fmt: skip


def test_headers_are_the_sdks_plus_the_id() -> None:
    config = TaskPushNotificationConfig(
        url="https://h/x", token="tok",
        authentication=AuthenticationInfo(scheme="Bearer", credentials="cred"),
    )  # fmt: skip
    assert headers_for(config, "n1") == {
        "X-A2A-Notification-Id": "n1",
        "X-A2A-Notification-Token": "tok",
        "Authorization": "Bearer cred",
    }
    assert headers_for(TaskPushNotificationConfig(url="https://h/x"), "n2") == {
        "X-A2A-Notification-Id": "n2"
    }


async def test_default_url_policy() -> None:
    refuse = default_url_validator()
    for url in (
        "http://127.0.0.1/x", "http://localhost:8080/x", "http://[::1]/x",
        "http://169.254.169.254/latest/meta-data", "http://0.0.0.0/", "http://[::ffff:127.0.0.1]/",
        "ftp://example.com/", "http:///nohost", "http://no-such-host.invalid/",
    ):  # fmt: skip
        assert not await refuse(url), url
    assert await refuse("http://93.184.215.14/hook")  # a public address, not resolved
    allow = default_url_validator(["127.0.0.1", "LOCALHOST"])
    assert await allow("http://127.0.0.1:9/x") and await allow("http://localhost/x")
    assert not await allow("http://169.254.169.254/")
