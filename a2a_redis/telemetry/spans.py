"""Spans: one CLIENT span per store operation, per publish that appends, per subscription.

Never one per delivered event. Each span of an operation carries ``db.system.name``,
``db.operation.name`` and, set once at its end, what the operation cost:
``a2a_redis.round_trips``, ``a2a_redis.retries`` and ``a2a_redis.conflicts``. A subscription's
span links to each distinct producer context it delivers from (the first :data:`MAX_LINKS`),
and the delivery latency is measured there.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from a2a.server.cluster import ConcurrentTaskModificationError

from a2a_redis.errors import ContentionError, TaskOwnedElsewhereError
from a2a_redis.telemetry.context import _span_context, extract
from a2a_redis.telemetry.state import _OURS, _S, Operation, _live, _recording

try:
    from opentelemetry import metrics as _metrics
    from opentelemetry import trace as _trace
    from opentelemetry.context import get_current as _get_current
except ImportError:  # no otel extra: never reached (nothing records)
    _metrics = _trace = _get_current = None  # type: ignore[assignment]

__all__ = ["MAX_LINKS", "Subscription", "served", "span", "store_operation", "subscription"]

#: Distinct producer contexts a subscription span links to, at most.
MAX_LINKS = 32
_DB = {"db.system.name": "redis"}
_ATTRIBUTES: dict[str, dict[str, str]] = {}  # a span's fixed attributes, per operation
_CONFLICTS = (ConcurrentTaskModificationError, ContentionError, TaskOwnedElsewhereError)
_PATHS = ({"path": "live"}, {"path": "backlog"})  # written after, or before, the join
_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def _start(operation: str) -> Any:
    """A CLIENT span ``a2a_redis <operation>``, child of the current span; None when off.

    Its attributes are all set at its end, in one call (:func:`_end`): the SDK cleans them
    and takes the span's lock once per call. (A sampler sees none; the name tells the
    operation.)
    """
    tracer = _S.tracer
    if tracer is None:
        return None
    # The current context, read once: else the tracer and its sampler each read it again.
    return tracer.start_span(f"a2a_redis {operation}", _get_current(), _trace.SpanKind.CLIENT)


def _end(operation: Operation, name: str, conflicts: int) -> None:
    """Set the span's attributes, with what the operation cost, and end it."""
    static = _ATTRIBUTES.get(name)
    if static is None:
        static = _ATTRIBUTES[name] = {**_DB, "db.operation.name": name}
    operation.span.set_attributes(
        {
            **static,
            "a2a_redis.round_trips": operation.round_trips,
            "a2a_redis.retries": operation.retries,
            "a2a_redis.conflicts": conflicts,
        }
    )
    operation.span.end()


@contextmanager
def span(operation: str) -> Iterator[Any]:
    """Run the block in our span ``a2a_redis <operation>`` (None when off)."""
    current = _start(operation)
    if current is None:
        yield None
        return
    ours = Operation(current)
    token = _OURS.set(ours)
    try:
        yield current
    except Exception as e:
        _failed(current, e)
        raise
    finally:
        _OURS.reset(token)
        _end(ours, operation, 0)


def _failed(current: Any, error: BaseException) -> None:
    """Mark a span failed, naming only the error's type (its message may name a task)."""
    current.set_status(_trace.Status(_trace.StatusCode.ERROR, type(error).__name__))
    current.set_attribute("error.type", type(error).__name__)


def store_operation(operation: str) -> Callable[[_F], _F]:
    """Decorate a store method: its span and its ``a2a_redis.store.duration``.

    The outcome is ``conflict`` for the SDK's ``ConcurrentTaskModificationError`` (and its
    subclasses), ``error`` for any other exception, else ``ok``.
    """
    outcomes = {o: {"operation": operation, "outcome": o} for o in ("ok", "conflict", "error")}

    def decorate(method: _F) -> _F:
        @functools.wraps(method)
        async def measured(*args: Any, **kwargs: Any) -> Any:
            if not _S.on or not _recording():  # no SDK: not even the API's no-ops
                return await method(*args, **kwargs)
            start = time.perf_counter()
            outcome = "error"
            current = _start(operation)
            ours = token = None
            if current is not None:
                ours = Operation(current)
                token = _OURS.set(ours)
            try:
                result = await method(*args, **kwargs)
                outcome = "ok"
                return result
            except Exception as e:
                outcome = "conflict" if isinstance(e, _CONFLICTS) else "error"
                if current is not None:
                    _failed(current, e)
                raise
            finally:
                if ours is not None:
                    _OURS.reset(token)  # type: ignore[arg-type]
                    _end(ours, operation, int(outcome == "conflict"))
                _S.i["store"].record(time.perf_counter() - start, outcomes[outcome])

        return measured  # type: ignore[return-value]

    return decorate


async def served(
    operation: str, message: dict[str, Any], serve: Callable[[dict[str, Any]], Awaitable[None]]
) -> None:
    """Run ``serve(message)`` from another replica in a SERVER span, child of the sender's."""
    tracer = _S.tracer
    if tracer is None:
        await serve(message)
        return
    remote = extract(message)
    parent = _trace.set_span_in_context(_trace.NonRecordingSpan(remote)) if remote else None
    with tracer.start_as_current_span(
        f"a2a_redis {operation}",
        context=parent,
        kind=_trace.SpanKind.SERVER,
        attributes={**_DB, "db.operation.name": operation},
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            await serve(message)
        except Exception as e:
            _failed(current, e)
            raise


class Subscription:
    """One subscriber's telemetry: its span, links, delivery latency and the gauge."""

    __slots__ = ("_delivery", "_links", "_span", "_subscribers", "joined_us")

    def __init__(self, tracer: Any, live_metrics: bool) -> None:
        self.joined_us = time.time_ns() // 1000
        self._span = None
        if tracer is not None:
            self._span = tracer.start_span(
                "a2a_redis subscribe",
                kind=_trace.SpanKind.CLIENT,
                attributes={**_DB, "db.operation.name": "subscribe"},
            )
        self._links: set[bytes] = set()
        self._delivery = _S.i["delivery"] if live_metrics else None
        self._subscribers = _S.i["subscribers"] if live_metrics else None
        if self._subscribers is not None:
            self._subscribers.add(1)

    def delivered(self, context: bytes | None) -> None:
        """An entry carrying ``context`` (``entry_context``) was delivered."""
        if context is None:
            return
        stamp, _, parent = context.partition(b";")
        if self._delivery is not None and stamp.isdigit():
            written = int(stamp)
            latency = max(time.time_ns() // 1000 - written, 0) / 1e6
            self._delivery.record(latency, _PATHS[written < self.joined_us])
        links = self._links
        if parent and self._span is not None and len(links) < MAX_LINKS and parent not in links:
            remote = _span_context(parent)
            if remote is not None:
                links.add(parent)
                self._span.add_link(remote)

    def close(self, error: BaseException | None = None) -> None:
        """The subscription ended (with ``error``, if it raised)."""
        if self._subscribers is not None:
            self._subscribers.add(-1)
            self._subscribers = None
        if self._span is not None:
            self._span.set_attribute("a2a_redis.links", len(self._links))
            if isinstance(error, Exception):
                _failed(self._span, error)
            self._span.end()
            self._span = None


def subscription() -> Subscription | None:
    """A new subscriber's telemetry, or None when nothing would record it (no SDK)."""
    if not _S.on:
        return None
    tracer = _S.tracer
    if _S.tracer_provider is None and not _live(_trace.get_tracer_provider()):
        tracer = None
    live_metrics = _S.meter_provider is not None or _live(_metrics.get_meter_provider())
    if tracer is None and not live_metrics:
        return None
    return Subscription(tracer, live_metrics)
