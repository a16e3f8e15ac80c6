"""OpenTelemetry for a2a-redis: metrics, spans, trace context across replicas, log trace ids.

Everything OpenTelemetry lives here, through the API only (the ``otel`` extra): without it
every call is a no-op; with the API but no SDK the hot paths skip even the API's no-ops.

- Meter ``a2a_redis``: the README's table. Low-cardinality attributes only (no ids).
- Tracer ``a2a-redis``: one CLIENT span per store operation, per publish that appends, and
  per subscription (never one per event), nested under the current span. The SDK's switch
  ``OTEL_INSTRUMENTATION_A2A_SDK_ENABLED=false`` turns our spans off too.
- Trace context: each stream entry written by this release carries its writer's wall
  clock and, inside a span, that span's W3C ``traceparent`` (:func:`entry_context`). The
  subscription span on the delivering replica links to each distinct producer context it
  delivers from (the first :data:`MAX_LINKS`), and the delivery latency is measured there.
- Logs: :class:`TraceContextFilter` gives our records ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from a2a.server.cluster import ConcurrentTaskModificationError

from a2a_redis.errors import ContentionError, TaskOwnedElsewhereError

try:
    from opentelemetry import metrics as _metrics
    from opentelemetry import trace as _trace
except ImportError:  # the otel extra is not installed: everything below is a no-op
    _metrics = _trace = None  # type: ignore[assignment]

__all__ = [
    "ENABLED_ENV_VAR",
    "MAX_LINKS",
    "METER_NAME",
    "TRACER_NAME",
    "Subscription",
    "TraceContextFilter",
    "configure",
    "count",
    "entry_context",
    "extract",
    "inject",
    "instrument_logging",
    "observe",
    "payload_rejected",
    "served",
    "span",
    "store_operation",
    "subscription",
]

METER_NAME = "a2a_redis"
TRACER_NAME = "a2a-redis"
ENABLED_ENV_VAR = "OTEL_INSTRUMENTATION_A2A_SDK_ENABLED"
#: Distinct producer contexts a subscription span links to, at most.
MAX_LINKS = 32
_DB = {"db.system.name": "redis"}
_ATTRIBUTES: dict[str, dict[str, str]] = {}  # a span's attributes, per operation
_CONFLICTS = (ConcurrentTaskModificationError, ContentionError, TaskOwnedElsewhereError)
_PATHS = ({"path": "live"}, {"path": "backlog"})  # written after, or before, the join
_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


class _State:
    """The instruments and tracer in use (rebuilt by :func:`configure`)."""

    def __init__(self) -> None:
        self.on = False  # the API is importable and not switched off
        self.tracer: Any = None  # None: no spans (switched off, or no API)
        self.meter_provider: Any = None
        self.tracer_provider: Any = None
        self.i: dict[str, Any] = {}
        self.live: tuple[float, bool] = (0.0, False)  # (until when, whether an SDK records)
        self.observed: dict[str, weakref.WeakKeyDictionary[Any, Callable[[Any], int]]] = {}


_S = _State()


def configure(
    *,
    enabled: bool = True,
    meter_provider: Any = None,
    tracer_provider: Any = None,
    tracing: bool | None = None,
) -> None:
    """(Re)build the instruments and tracer (done at import, with the global providers).

    ``enabled=False``: everything off, as without OpenTelemetry. Explicit providers serve
    tests and benchmarks. ``tracing`` None reads :data:`ENABLED_ENV_VAR` (not ``true``: no spans).
    """
    _S.on = enabled and _metrics is not None
    _S.meter_provider, _S.tracer_provider = meter_provider, tracer_provider
    _S.live = (0.0, False)
    if tracing is None:
        tracing = os.getenv(ENABLED_ENV_VAR, "true").lower() == "true"
    if not _S.on:
        _S.tracer, _S.i = None, {}
        return
    meter = (meter_provider or _metrics.get_meter_provider()).get_meter(METER_NAME)
    _S.tracer = None
    if tracing:
        _S.tracer = (tracer_provider or _trace.get_tracer_provider()).get_tracer(TRACER_NAME)
    i = _S.i = {
        "store": meter.create_histogram(
            "a2a_redis.store.duration", unit="s", description="Task store operation time"
        ),
        "delivery": meter.create_histogram(
            "a2a_redis.stream.delivery_latency",
            unit="s",
            description="From an event's write on any replica to its delivery here",
        ),
        "subscribers": meter.create_up_down_counter(
            "a2a_redis.stream.subscribers", description="Live event stream subscribers here"
        ),
        "reconnects": meter.create_counter(
            "a2a_redis.listener.reconnects", description="Pub/sub connection reconnects"
        ),
        "lagged": meter.create_counter(
            "a2a_redis.subscriber.lagged", description="Subscribers whose events were trimmed"
        ),
        "owner_lost": meter.create_counter(
            "a2a_redis.owner.lost", description="Subscribers whose task's replica went silent"
        ),
        "rejected": meter.create_counter(
            "a2a_redis.payload.rejected", description="Payloads refused (attribute reason)"
        ),
    }
    for name, monotonic, what in _OBSERVED:
        watched = _S.observed.setdefault(name, weakref.WeakKeyDictionary())
        make = meter.create_observable_up_down_counter
        make = meter.create_observable_counter if monotonic else make
        i[name] = make(name, callbacks=[functools.partial(_observe, watched)], description=what)


_PUSH_COUNTED = ("delivered", "retried", "dead", "claimed", "refused")  # (push sender's)
#: Instruments read from the components' own counts at each collection: (name, monotonic).
_OBSERVED = (
    ("a2a_redis.leases.held", False, "Task leases this replica holds"),
    ("a2a_redis.queue.taps", False, "Remote event queue taps open here"),
    ("a2a_redis.cancels.forwarded", True, "Cancels sent to the replica running the task"),
    ("a2a_redis.orphans.failed", True, "Running tasks of dead replicas failed by this one"),
    *((f"a2a_redis.push.{k}", True, f"Push notifications {k}") for k in _PUSH_COUNTED),
    *((f"a2a_redis.push.{k}", False, f"Push delivery {k} here") for k in ("in_flight", "jobs")),
)


def _observe(watched: weakref.WeakKeyDictionary[Any, Callable[[Any], int]], _options: Any) -> Any:
    total = sum(count(owner) for owner, count in list(watched.items()))
    yield _metrics.Observation(total)


def observe(name: str, owner: Any, count: Callable[[Any], int]) -> None:
    """Report ``count(owner)`` in ``name`` (of :data:`_OBSERVED`) while ``owner`` lives."""
    _S.observed.setdefault(name, weakref.WeakKeyDictionary())[owner] = count


def _recording() -> bool:
    """Whether an SDK records our metrics or spans (False for the API's no-ops alone).

    The global providers are looked up at most once a second (a lookup costs 1.7 µs).
    """
    if _S.meter_provider is not None or _S.tracer_provider is not None:
        return True
    now = time.monotonic()
    if now < _S.live[0]:
        return _S.live[1]
    meters, tracers = _metrics.get_meter_provider(), _trace.get_tracer_provider()
    live = _live(meters) or (_S.tracer is not None and _live(tracers))
    _S.live = (now + 1.0, live)
    return live


def _live(provider: Any) -> bool:
    """Whether a provider records (the API's own no-op and proxy providers do not)."""
    return not type(provider).__module__.startswith(
        ("opentelemetry.metrics", "opentelemetry.trace")
    )


def count(name: str, attributes: dict[str, str] | None = None) -> None:
    """Add 1 to ``reconnects`` (pub/sub, ours or redis-py's), ``lagged`` or ``owner_lost``."""
    instrument = _S.i.get(name)
    if instrument is not None:
        instrument.add(1, attributes)


def payload_rejected(reason: str) -> None:
    """A payload was refused; ``reason`` is a fixed word (``too_large``)."""
    count("rejected", {"reason": reason})


# -- spans -----------------------------------------------------------------------------------
#: Our span in progress. Not made the OpenTelemetry current span (attaching a context costs
#: more than the span): nothing nests under it, and the entries and logs written meanwhile
#: read it here.
_OURS: contextvars.ContextVar[Any] = contextvars.ContextVar("a2a_redis_span", default=None)


def _start(operation: str) -> Any:
    """A CLIENT span ``a2a_redis <operation>``, child of the current span; None when off."""
    tracer = _S.tracer
    if tracer is None:
        return None
    attributes = _ATTRIBUTES.get(operation)
    if attributes is None:
        attributes = _ATTRIBUTES[operation] = {**_DB, "db.operation.name": operation}
    return tracer.start_span(
        f"a2a_redis {operation}", kind=_trace.SpanKind.CLIENT, attributes=attributes
    )


@contextmanager
def span(operation: str) -> Iterator[Any]:
    """Run the block in our span ``a2a_redis <operation>`` (None when off)."""
    current = _start(operation)
    if current is None:
        yield None
        return
    token = _OURS.set(current)
    try:
        yield current
    except Exception as e:
        _failed(current, e)
        raise
    finally:
        _OURS.reset(token)
        current.end()


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
            token = _OURS.set(current) if current is not None else None
            try:
                result = await method(*args, **kwargs)
                outcome = "ok"
                return result
            except Exception as e:
                outcome = "conflict" if isinstance(e, _CONFLICTS) else "error"
                if current is not None:
                    _failed(current, e)
                    current.set_attribute("a2a_redis.conflicts", int(outcome == "conflict"))
                raise
            finally:
                if token is not None:
                    _OURS.reset(token)
                    current.end()
                _S.i["store"].record(time.perf_counter() - start, outcomes[outcome])

        return measured  # type: ignore[return-value]

    return decorate


# -- trace context -----------------------------------------------------------------------------
def _traceparent() -> bytes | None:
    """The current span's W3C ``traceparent``, if a valid span is current."""
    if _S.tracer is None:
        return None
    context = (_OURS.get() or _trace.get_current_span()).get_span_context()
    if not context.is_valid:
        return None
    return b"00-%032x-%016x-%02x" % (context.trace_id, context.span_id, context.trace_flags)


def entry_context() -> bytes | None:
    """The stream-entry field value: the writer's clock in µs, then ``;traceparent``.

    None (no field) unless an SDK records here: without one, writing costs nothing.
    """
    if not _S.on or not _recording():
        return None
    stamp = b"%d" % (time.time_ns() // 1000)
    parent = _traceparent()
    return stamp if parent is None else stamp + b";" + parent


def _span_context(traceparent: bytes | str | None) -> Any:
    """The remote SpanContext a ``traceparent`` names, or None if it is not one."""
    if not traceparent or _S.tracer is None:
        return None
    raw = traceparent.decode("ascii", "replace") if isinstance(traceparent, bytes) else traceparent
    parts = raw.split("-")
    try:
        if len(parts) != 4 or parts[0] != "00" or len(parts[1]) != 32 or len(parts[2]) != 16:
            return None
        context = _trace.SpanContext(
            int(parts[1], 16), int(parts[2], 16), True, _trace.TraceFlags(int(parts[3], 16) & 1)
        )
    except ValueError:
        return None
    return context if context.is_valid else None


def inject(message: dict[str, Any]) -> None:
    """Put the current span's ``traceparent`` into a control message (key ``tp``)."""
    parent = _traceparent()
    if parent is not None:
        message["tp"] = parent.decode()


def extract(message: dict[str, Any]) -> Any:
    """The remote span context a control message carries, or None."""
    value = message.get("tp")
    return _span_context(value) if isinstance(value, (str, bytes)) else None


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
        """An entry carrying ``context`` (:func:`entry_context`) was delivered."""
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


# -- logs --------------------------------------------------------------------------------------
class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (hex, ``""`` without a span) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``; never drops it."""
        trace_id = span_id = ""
        if _trace is not None and _S.on:
            context = (_OURS.get() or _trace.get_current_span()).get_span_context()
            if context.is_valid:
                trace_id, span_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"
        record.trace_id, record.span_id = trace_id, span_id
        return True


_FILTER = TraceContextFilter()


def instrument_logging() -> None:
    """Give every ``a2a_redis`` logger the :class:`TraceContextFilter` (idempotent)."""
    manager = logging.Logger.manager
    for name, logger in list(manager.loggerDict.items()):
        ours = name == "a2a_redis" or name.startswith("a2a_redis.")
        if ours and isinstance(logger, logging.Logger) and _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


configure()
