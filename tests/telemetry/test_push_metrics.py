"""The push sender's counts reach OpenTelemetry as ``a2a_redis.push.*`` instruments."""

from __future__ import annotations

import gc

from tests.helpers import backend_pair, eventually
from tests.push.receiver import running_receiver
from tests.push.test_delivery import configure, run_task, sender_for
from tests.telemetry.conftest import Otel


async def test_deliveries_and_retries_are_observed(otel: Otel, real_url: str, prefix: str) -> None:
    gc.collect()  # the closed senders of earlier tests are no longer observed
    before = {k: otel.value(f"a2a_redis.push.{k}") for k in ("delivered", "retried", "dead")}
    async with running_receiver() as receiver, backend_pair(real_url, prefix) as (a, _):
        receiver.path("x").fail_first = 1  # one failed attempt per event, then a 200
        sender = sender_for(a)
        await sender.start()
        try:
            await configure(a, "task-1", receiver, "x")
            await run_task(a, "task-1", 2)  # the Task, 2 WORKING updates, COMPLETED: 4
            await eventually(lambda: len(receiver.delivered("x")) >= 4, what="4 deliveries")
            await eventually(lambda: sender.stats()["jobs"] == 0, what="the job done")
            assert otel.value("a2a_redis.push.delivered") - before["delivered"] == 4
            assert otel.value("a2a_redis.push.retried") - before["retried"] == 4
            assert otel.value("a2a_redis.push.dead") - before["dead"] == 0
            assert otel.value("a2a_redis.push.in_flight") == 0
            assert otel.value("a2a_redis.push.jobs") == 0
            otel.assert_no_identifiers()
        finally:
            await sender.aclose()
