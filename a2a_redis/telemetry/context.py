"""Trace context across replicas (stream entries, control messages) and in our log records.

Each stream entry written by this release carries its writer's wall clock and, inside a
span, that span's W3C ``traceparent`` (:func:`entry_context`); a control message carries
the sender's (:func:`inject`). Entries written by older versions carry none and still decode.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from a2a_redis.telemetry.state import _OURS, _S, _recording

try:
    from opentelemetry import trace as _trace
except ImportError:  # no otel extra: never reached (nothing records)
    _trace = None  # type: ignore[assignment]

__all__ = ["TraceContextFilter", "entry_context", "extract", "inject", "instrument_logging"]


def _current_span() -> Any:
    """Our operation's span, else the OpenTelemetry current span."""
    operation = _OURS.get()
    return _trace.get_current_span() if operation is None else operation.span


def _traceparent(span: Any = None) -> bytes | None:
    """The W3C ``traceparent`` of ``span`` (None: the current span), if it is valid."""
    if _S.tracer is None:
        return None
    context = (_current_span() if span is None else span).get_span_context()
    if not context.is_valid:
        return None
    return b"00-%032x-%016x-%02x" % (context.trace_id, context.span_id, context.trace_flags)


def entry_context() -> bytes | None:
    """The stream-entry field value: the writer's clock in µs, then ``;traceparent``.

    None (no field) unless an SDK records here: without one, writing costs nothing.
    """
    operation = _OURS.get()  # (one is in progress only while an SDK records)
    if operation is None and (not _S.on or not _recording()):
        return None
    stamp = b"%d" % (time.time_ns() // 1000)
    parent = _traceparent(None if operation is None else operation.span)
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


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (hex, ``""`` without a span) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``; never drops it."""
        trace_id = span_id = ""
        if _trace is not None and _S.on:
            context = _current_span().get_span_context()
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
