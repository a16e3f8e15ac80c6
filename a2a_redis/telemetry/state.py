"""The instruments and tracer in use, the metrics table, and the operation in progress.

:func:`configure` (run at import, with the global providers) builds the README table's
instruments and the tracer; without the ``otel`` extra, or switched off, there are none.
:class:`Operation` is our operation in progress (its span and its counts), kept in a
contextvar: the Redis plumbing bumps its counts through :func:`round_trip` and
:func:`retried`, which cost one contextvar read when no span records.
"""

from __future__ import annotations

import contextvars
import functools
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

try:
    from opentelemetry import metrics as _metrics
    from opentelemetry import trace as _trace
except ImportError:  # the otel extra is not installed: everything is a no-op
    _metrics = _trace = None  # type: ignore[assignment]

__all__ = [
    "ENABLED_ENV_VAR",
    "METER_NAME",
    "TRACER_NAME",
    "Operation",
    "configure",
    "count",
    "observe",
    "payload_rejected",
    "retried",
    "round_trip",
]

METER_NAME = "a2a_redis"
TRACER_NAME = "a2a-redis"
ENABLED_ENV_VAR = "OTEL_INSTRUMENTATION_A2A_SDK_ENABLED"


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


# -- the operation in progress ------------------------------------------------------------------
class Operation:
    """Our operation in progress: its span and what it cost, set on the span at its end."""

    __slots__ = ("retries", "round_trips", "span")

    def __init__(self, span: Any) -> None:
        self.span = span
        self.round_trips = 0
        self.retries = 0


#: Our operation in progress, only while its span records. Its span is not made the
#: OpenTelemetry current span (attaching a context costs more than the span): nothing nests
#: under it, and the entries, messages and logs written meanwhile read it here.
_OURS: contextvars.ContextVar[Operation | None] = contextvars.ContextVar(
    "a2a_redis_operation", default=None
)


def round_trip() -> None:
    """One round trip to Redis of the operation in progress (its ``a2a_redis.round_trips``)."""
    operation = _OURS.get()
    if operation is not None:
        operation.round_trips += 1


def retried() -> None:
    """The operation in progress retries (a lost race, or a transient error)."""
    operation = _OURS.get()
    if operation is not None:
        operation.retries += 1


configure()
