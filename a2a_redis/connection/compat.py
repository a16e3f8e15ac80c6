"""What differs between the redis-py and Python releases we support, handled in one place.

- **Timeouts.** ``asyncio.timeout`` is Python 3.11+; :func:`within` uses it there, and
  ``asyncio.wait_for`` on 3.10.

- **RESP3 by default.** redis-py 8 speaks RESP3 unless told ``protocol=2``, which a user
  may choose. Our commands read replies whose shapes agree in both protocols, or normalize
  them here (:func:`reply_pairs`).
- **Pub/sub push handlers.** We give every ``PubSub`` our own push handler, because
  redis-py's default logs each RESP3 push whole (user data). Before redis-py 8 the pure
  Python RESP2 parser has no push hook, and ``PubSub.connect`` raises ``AttributeError``
  on it: :class:`QuietPubSub` offers the handler only to a parser that takes it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from a2a_redis import telemetry

__all__ = ["QuietPubSub", "pubsub", "quiet_push", "reply_pairs", "within"]

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """Await ``awaitable`` for at most ``timeout`` seconds (None: no limit).

    Raises the builtin ``TimeoutError`` on every Python (3.10's ``asyncio.TimeoutError``
    is another class). On 3.11+ no extra Task is created.
    """
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout):
            return await awaitable
    try:  # pragma: no cover - Python 3.10
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError as e:  # pragma: no cover - Python 3.10
        raise TimeoutError(str(e)) from e


async def quiet_push(response: Any) -> Any:
    """Our handler of RESP3 pub/sub pushes: passes them on without logging.

    redis-py's default handler logs every pub/sub message whole (logger
    ``push_response``), and our wake-ups carry events: user text must not reach logs.
    """
    return response


class QuietPubSub(PubSub):
    """redis-py's ``PubSub`` with :func:`quiet_push` as the push handler where one is taken.

    redis-py installs ``push_handler_func`` on the connection's parser at every (re)connect.
    A RESP2 parser has no pushes to log, and before redis-py 8 no hook to take one, so the
    handler is offered only to a parser that has ``set_pubsub_push_handler``.
    """

    @property
    def push_handler_func(self) -> Any:
        """:func:`quiet_push`, or None for a connection whose parser takes no push handler."""
        connection = self.connection
        if connection is None or hasattr(connection._parser, "set_pubsub_push_handler"):
            return quiet_push
        return None

    @push_handler_func.setter
    def push_handler_func(self, _value: Any) -> None:
        """Ignored: ``PubSub.__init__`` assigns it; the handler is always ours."""

    #: Reconnects redis-py made by itself (after CLIENT KILL, say): ``on_connect`` is
    #: registered once the first connection is made, so each call is a reconnect.
    reconnects = 0

    async def on_connect(self, connection: Any) -> None:
        """Count the reconnect, then re-subscribe as redis-py does."""
        self.reconnects += 1
        telemetry.count("reconnects")
        await super().on_connect(connection)


def pubsub(redis: Redis) -> QuietPubSub:
    """A :class:`QuietPubSub` on ``redis``'s pool, made as ``Redis.pubsub()`` makes one."""
    return QuietPubSub(
        redis.connection_pool, event_dispatcher=getattr(redis, "_event_dispatcher", None)
    )


def reply_pairs(reply: dict[Any, Any] | Sequence[Any]) -> list[tuple[Any, Any]]:
    """A reply of name-value pairs in whichever shape it came.

    RESP3 sends a map (a dict); RESP2 a flat ``[name, value, ...]`` list; and some of
    redis-py's parsers (``PUBSUB NUMSUB`` on 8.2) return ``[(name, value), ...]``.
    """
    if isinstance(reply, dict):
        return list(reply.items())
    if reply and isinstance(reply[0], (list, tuple)):
        return [(name, value) for name, value in reply]
    return list(zip(reply[::2], reply[1::2], strict=True))
