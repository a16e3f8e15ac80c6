"""OpenTelemetry for a2a-redis: metrics, spans, trace context across replicas, log trace ids.

Everything OpenTelemetry lives in this package, through the API only (the ``otel`` extra):
without it every call is a no-op; with the API but no SDK the hot paths skip even the API's
no-ops.

- Meter ``a2a_redis`` (``state.py``): the README's table. Low-cardinality attributes only.
- Tracer ``a2a-redis`` (``spans.py``): one CLIENT span per store operation, per publish that
  appends, and per subscription (never one per event), nested under the current span, with
  the operation's round trips, retries and conflicts. The SDK's switch
  ``OTEL_INSTRUMENTATION_A2A_SDK_ENABLED=false`` turns our spans off too.
- Trace context (``context.py``): each stream entry written by this release carries its
  writer's wall clock and, inside a span, that span's W3C ``traceparent``. The subscription
  span on the delivering replica links to each distinct producer context it delivers from
  (the first :data:`MAX_LINKS`), and the delivery latency is measured there.
- Logs: :class:`TraceContextFilter` gives our records ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

from a2a_redis.telemetry.context import (
    TraceContextFilter,
    entry_context,
    extract,
    inject,
    instrument_logging,
)
from a2a_redis.telemetry.spans import (
    MAX_LINKS,
    Subscription,
    served,
    span,
    store_operation,
    subscription,
)
from a2a_redis.telemetry.state import (
    ENABLED_ENV_VAR,
    METER_NAME,
    TRACER_NAME,
    configure,
    count,
    observe,
    payload_rejected,
    retried,
    round_trip,
)

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
    "retried",
    "round_trip",
    "served",
    "span",
    "store_operation",
    "subscription",
]
