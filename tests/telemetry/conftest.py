"""An SDK meter and tracer over in-memory readers, given to ``a2a_redis.telemetry``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from a2a_redis import telemetry

#: Attribute values that name a tenant or a task must never appear in telemetry.
IDENTIFYING = ("task-", "ctx", "alice", "bob")


class Otel:
    """The SDK providers in use, and what they recorded."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.exporter = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.tracers.get_tracer("test")

    def install(self, *, tracing: bool | None = True) -> None:
        telemetry.configure(
            meter_provider=self.meters, tracer_provider=self.tracers, tracing=tracing
        )

    def points(self, name: str) -> list[Any]:
        """The data points of metric ``name`` (cumulative)."""
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found += metric.data.data_points
        return found

    def value(self, name: str, **attributes: str) -> float:
        """The sum (or histogram count) of ``name``'s points with these attributes."""
        total = 0.0
        for point in self.points(name):
            if all(point.attributes.get(k) == v for k, v in attributes.items()):
                total += getattr(point, "count", None) or getattr(point, "value", 0)
        return total

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        found = list(self.exporter.get_finished_spans())
        return [s for s in found if name is None or s.name == name]

    def assert_no_identifiers(self) -> None:
        """No attribute of any span or metric point names a task, context or owner."""
        values: list[str] = []
        for span in self.spans():
            values += [str(v) for v in (span.attributes or {}).values()]
            for event in span.events:
                values += [str(v) for v in (event.attributes or {}).values()]
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        values += [str(v) for v in point.attributes.values()]
        leaked = [v for v in values if any(marker in v for marker in IDENTIFYING)]
        assert leaked == []


@pytest.fixture
def otel() -> Iterator[Otel]:
    """SDK providers installed into ``a2a_redis.telemetry``; the defaults restored after."""
    recorded = Otel()
    recorded.install()
    yield recorded
    telemetry.configure()
    recorded.meters.shutdown()
    recorded.tracers.shutdown()
