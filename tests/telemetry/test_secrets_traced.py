"""The reliability suite's secrets scenario, run with tracing and metrics on.

Two replicas, a streaming task whose message and artifacts carry markers, a resubscribe,
a cancel across replicas, push configs with a token and credentials, failure paths and a
server restart (``tests/reliability/test_secrets.py``). No marker may appear in any span
name, attribute, event, link or status, in any metric attribute, or in our log records;
and our records logged inside a span carry its trace id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from a2a_redis.ops.embedded import EmbeddedServer
from tests.reliability.test_secrets import Markers, Scenario, leaks, run_scenario
from tests.telemetry.conftest import Otel


@pytest.fixture
def durable_server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer(appendonly=True) as server:
        yield server


async def test_no_secret_reaches_spans_metrics_or_logs(
    otel: Otel,
    caplog: pytest.LogCaptureFixture,
    durable_server: EmbeddedServer,
    prefix: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="a2a_redis")
    markers = Markers()
    sc = Scenario(durable_server.url, prefix, markers, lambda: caplog.records)
    try:
        with otel.tracer.start_as_current_span("scenario"):
            await run_scenario(durable_server, prefix, sc)
    finally:
        await sc.close()

    spans = otel.spans()
    assert {"a2a_redis save", "a2a_redis subscribe", "a2a_redis get"} <= {s.name for s in spans}
    texts: list[str] = []
    for span in spans:
        texts += [span.name, str(span.status.description)]
        texts += [f"{k}={v}" for k, v in (span.attributes or {}).items()]
        for event in span.events:
            texts += [event.name, *(str(v) for v in (event.attributes or {}).values())]
        for link in span.links:
            texts += [str(link.context), *(str(v) for v in (link.attributes or {}).values())]
    found = [t for t in texts if markers.found_in(t)]
    assert found == []
    otel.assert_no_identifiers()
    ours = [r for r in caplog.records if r.name.startswith("a2a_redis")]
    assert leaks(ours, markers) == {}
    assert any(getattr(r, "trace_id", "") for r in ours)  # logged inside a span: its id
