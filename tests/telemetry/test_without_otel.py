"""Without the ``otel`` extra: the package imports, works, and telemetry is a no-op."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import ROOT

SCENARIO = textwrap.dedent(
    """
    import tests.telemetry.no_otel  # blocks opentelemetry before anything imports it

    import asyncio, logging, sys
    import fakeredis
    from a2a.server.cluster import TaskVersion, VersionedEvent
    from a2a_redis import RedisTaskEventStream, VersionedRedisTaskStore, telemetry
    from a2a_redis.log.codec import E_CONTEXT
    from tests.helpers import ctx, make_task

    async def main():
        redis = fakeredis.FakeAsyncRedis()
        store = VersionedRedisTaskStore(redis, prefix="p")
        stream = RedisTaskEventStream(redis, task_store=store)
        assert telemetry.subscription() is None and telemetry.entry_context() is None
        task = make_task("t")
        missing = TaskVersion.MISSING
        version = await store.save(task, event=task, prev_version=missing, context=ctx())
        await stream.publish("t", VersionedEvent(task, version))
        assert (await store.get("t", ctx())).version == version
        rows = await redis.xrange(store.keys.events("t"))
        assert all(E_CONTEXT not in fields for _, fields in rows)
        async for item in stream.subscribe("t", after=TaskVersion.MISSING):
            assert item.version == version
            break
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("a2a_redis").addHandler(handler)
        logging.getLogger("a2a_redis.log.event_log").warning("probe")
        assert records[0].trace_id == ""
        await stream.aclose()
        print("no-otel ok", "opentelemetry" in sys.modules)

    asyncio.run(main())
    """
)


def test_the_package_works_without_opentelemetry() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCENARIO],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "no-otel ok False"
