"""The benchmarks ``python -m benchmarks`` knows, in the order it runs them.

To add one (event stream latency, queue manager, ...): write a module exposing a
``BENCHMARK = Benchmark(name, description, run)`` and append it here.
"""

from __future__ import annotations

from benchmarks import (
    control,
    e2e,
    event_stream,
    fanout,
    joins,
    migrate,
    otel,
    push,
    queue_manager,
    scale,
    task_store,
)
from benchmarks.common import Benchmark

BENCHMARKS: list[Benchmark] = [
    task_store.BENCHMARK,
    event_stream.BENCHMARK,
    joins.BENCHMARK,
    fanout.BENCHMARK,
    queue_manager.BENCHMARK,
    control.BENCHMARK,
    push.BENCHMARK,
    scale.BENCHMARK,
    e2e.BENCHMARK,
    migrate.BENCHMARK,
    otel.BENCHMARK,
]
