"""``a2a-redis migrate``: from the a2a-sdk's own SQL stores (SQLite always, PostgreSQL and
MySQL/MariaDB on the machine's servers) into every real Redis.

The SQL side is created and filled through the SDK's classes (``VersionedDatabaseTaskStore``,
its plain ``as_task_store``, ``DatabasePushNotificationConfigStore``); only the corrupt-row
test damages rows by hand. Each test uses its own table names and drops them afterwards.
PostgreSQL is at ``A2A_REDIS_TEST_PG`` (default postgresql+asyncpg://postgres@127.0.0.1:5432/test),
MySQL at ``A2A_REDIS_TEST_MYSQL`` (default mysql+aiomysql://root@127.0.0.1:3306/test): if one
does not answer, its tests fail; they never skip.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from a2a.server.cluster import TaskVersion
from a2a.server.cluster.database_event_stream import DatabaseTaskEventStream
from a2a.server.cluster.database_task_store import VersionedDatabaseTaskStore
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.tasks.database_push_notification_config_store import (
    DatabasePushNotificationConfigStore,
)
from a2a.types.a2a_pb2 import (
    Artifact,
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    Task,
    TaskArtifactUpdateEvent,
    TaskPushNotificationConfig,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from a2a.utils.errors import A2AError
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from a2a_redis import RedisBackend
from a2a_redis.errors import DecryptionError
from a2a_redis.log.keys import Keys
from a2a_redis.ops import migrate as migrate_mod
from a2a_redis.ops.cli import main
from a2a_redis.ops.sql_source import SqlSource, Tables
from a2a_redis.stores.push_config_store import RedisPushNotificationConfigStore
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from tests.helpers import NamedUser, ScriptedAgent, agent_card, connect

# The SDK declares a model class per custom table name, and SQLAlchemy warns on the second
# class of the same name: each test here uses fresh table names, so that is expected.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This declarative base already contains a class:sqlalchemy.exc.SAWarning"
)
PG_DSN = os.environ.get("A2A_REDIS_TEST_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
MYSQL_DSN = os.environ.get("A2A_REDIS_TEST_MYSQL", "mysql+aiomysql://root@127.0.0.1:3306/test")
SERVERS = {
    "postgresql": ("A2A_REDIS_TEST_PG", PG_DSN),
    "mysql": ("A2A_REDIS_TEST_MYSQL", MYSQL_DSN),
}
OWNERS = ["", "alice", "bob"]
STATES = [
    TaskState.TASK_STATE_SUBMITTED,
    TaskState.TASK_STATE_WORKING,
    TaskState.TASK_STATE_INPUT_REQUIRED,
    TaskState.TASK_STATE_AUTH_REQUIRED,
    TaskState.TASK_STATE_COMPLETED,
    TaskState.TASK_STATE_FAILED,
    TaskState.TASK_STATE_CANCELED,
    TaskState.TASK_STATE_REJECTED,
]
T0_NS = 1_790_000_000_000_000_000  # microsecond-aligned: SQL keeps last_updated in us


def ctx(owner: str) -> ServerCallContext:
    return ServerCallContext(user=NamedUser(owner))


@dataclass
class Sql:
    """One test's SQL source: its engine, DSN and (unique) table names."""

    dsn: str
    engine: AsyncEngine
    tables: Tables

    made: dict[str, Any] = field(default_factory=dict)  # the SDK declares a model once per name

    def store(self) -> VersionedDatabaseTaskStore:
        if "store" not in self.made:
            self.made["store"] = VersionedDatabaseTaskStore(
                self.engine,
                table_name=self.tables.tasks,
                event_table_name=self.tables.events,
                version_table_name=self.tables.versions,
            )
        store: VersionedDatabaseTaskStore = self.made["store"]
        return store

    def push(self, key: bytes | None) -> DatabasePushNotificationConfigStore:
        assert "push" not in self.made
        self.made["push"] = DatabasePushNotificationConfigStore(
            self.engine, table_name=self.tables.push_configs, encryption_key=key
        )
        return self.made["push"]  # type: ignore[no-any-return]

    def argv(self, url: str, prefix: str, *more: str) -> list[str]:
        t = self.tables
        return [
            "migrate", "--from", self.dsn, "--to", url, "--prefix", prefix, "--json",
            "--tasks-table", t.tasks, "--versions-table", t.versions,
            "--events-table", t.events, "--push-table", t.push_configs, *more,
        ]  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
async def sql(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Sql]:
    name = f"mig{uuid.uuid4().hex[:10]}"  # unique tables: parallel runs share the servers
    tables = Tables(f"{name}_tasks", f"{name}_versions", f"{name}_events", f"{name}_push")
    server = request.param != "sqlite"
    if server:
        variable, dsn = SERVERS[request.param]
    else:
        dsn = f"sqlite+aiosqlite:///{tmp_path / 'sdk.db'}"
    if request.param == "mysql":
        mysql_bytes_fix(request.getfixturevalue("monkeypatch"))
    engine = create_async_engine(dsn)
    if server:
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as e:
            await engine.dispose()
            pytest.fail(f"{request.param} at {dsn} does not answer ({e}); set {variable}")
    yield Sql(dsn, engine, tables)
    if server:
        async with engine.begin() as conn:
            names = (tables.tasks, tables.versions, tables.events, tables.push_configs)
            for table in (*names, tables.events + "s"):
                await conn.execute(text(f"DROP TABLE IF EXISTS {quote(engine, table)}"))
    await engine.dispose()


def mysql_bytes_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiomysql 0.3.2 with PyMySQL >= 1.2.3 fails every bytes parameter (the SDK's event and
    push-config rows): it calls ``escape_bytes_prefixed``, now a placeholder string
    (aio-libs/aiomysql#1080). Use PyMySQL's ``escape_bytes`` (``_binary X'..'``), as the
    open fix (aio-libs/aiomysql#1081) does. Only the SDK's writes need it: migrate reads."""
    import aiomysql.connection
    import pymysql.converters

    if not callable(aiomysql.connection.escape_bytes_prefixed):
        monkeypatch.setattr(
            aiomysql.connection, "escape_bytes_prefixed", pymysql.converters.escape_bytes
        )


def quote(engine: AsyncEngine, name: str) -> str:
    """A table name quoted for the engine's dialect (MySQL: backticks)."""
    return engine.dialect.identifier_preparer.quote_identifier(name)


def _status(state: int, i: int, step: int) -> TaskStatus:
    status = TaskStatus(state=state)  # type: ignore[arg-type]
    status.timestamp.FromNanoseconds(T0_NS + (i * 10 + step) * 1_000_000_000)
    return status


async def fill(sql: Sql, n: int = 24, key: bytes | None = None) -> list[tuple[str, str]]:
    """``n`` tasks through the SDK's versioned store (2 more through its plain store), each
    owner's, two contexts, every state, with history, artifacts, events and push configs.
    Returns (task id, owner) pairs."""
    store, push = sql.store(), sql.push(key)
    made = []
    for i in range(n):
        owner, task_id, context_id = OWNERS[i % 3], f"task-{i:04d}", f"ctx-{i % 2}"
        msg = Message(message_id=f"m{i}", role=Role.ROLE_USER, parts=[Part(text=f"hi {i}")])
        task = Task(id=task_id, context_id=context_id, status=_status(1, i, 0), history=[msg])
        task.metadata.update({"n": i})
        v = await store.save(task, event=task, prev_version=TaskVersion.MISSING, context=ctx(owner))
        art = Artifact(artifact_id=f"a{i}", parts=[Part(text="x" * (i + 1))])
        task.artifacts.append(art)
        task.status.CopyFrom(_status(TaskState.TASK_STATE_WORKING, i, 1))
        event: Any = TaskArtifactUpdateEvent(task_id=task_id, context_id=context_id, artifact=art)
        v = await store.save(task, event=event, prev_version=v, context=ctx(owner))
        state = STATES[i % len(STATES)]
        if state != TaskState.TASK_STATE_WORKING:
            task.status.CopyFrom(_status(state, i, 2))
            event = TaskStatusUpdateEvent(
                task_id=task_id, context_id=context_id, status=task.status
            )
            await store.save(task, event=event, prev_version=v, context=ctx(owner))
        if i % 4 == 0:
            config = TaskPushNotificationConfig(id=f"cfg{i}", url=f"https://hook/{i}", token="tok")
            await push.set_info(task_id, config, ctx(owner))
        made.append((task_id, owner))
    for j in range(2):  # a plain DatabaseTaskStore's rows: no version
        task = Task(id=f"plain-{j}", context_id="ctx-0", status=_status(3, 100 + j, 0))
        await store.as_task_store.save(task, ctx("alice"))
        made.append((task.id, "alice"))
    return made


def run_cli(argv: list[str]) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    real = sys.stdout
    sys.stdout = out
    try:
        code = main(argv)
    finally:
        sys.stdout = real
    return code, json.loads(out.getvalue()) if out.getvalue().strip() else {}


async def cli(argv: list[str]) -> tuple[int, dict[str, Any]]:
    return await asyncio.to_thread(run_cli, argv)


async def test_migrate_then_the_redis_handler_answers_as_the_sql_handler(
    sql: Sql, real_url: str, prefix: str
) -> None:
    key = Fernet.generate_key()
    made = await fill(sql, key=key)
    code, out = await cli(
        sql.argv(real_url, prefix, "--verify", f"--encryption-key={key.decode()}")
    )
    assert code == 0, out
    counts = out["migrate"]
    assert (counts["copied"], counts["skipped"], counts["conflicts"], counts["failures"]) == (
        len(made), 0, 0, 0,
    )  # fmt: skip
    assert counts["push_configs"] == 6 and counts["events"] == 24 * 3 - 3
    assert out["verify"] == {"matching": len(made), "differing": 0, "differences": []}

    backend = RedisBackend.from_url(real_url, prefix=prefix)
    try:
        redis_handler = backend.request_handler(ScriptedAgent(), agent_card())
        sql_handler = DefaultRequestHandler(
            agent_executor=ScriptedAgent(),
            task_store=sql.store(),
            agent_card=agent_card(),
            # (publish is a no-op in the SDK's stream; a table of its own: the SDK declares
            # one model per table name, and the store has declared the events table's)
            event_stream=DatabaseTaskEventStream(sql.engine, table_name=sql.tables.events + "s"),
        )
        await compare_handlers(sql_handler, redis_handler, made)
        # versions come from SQL; events are in each task's stream
        stored = await backend.task_store.get("task-0004", ctx("alice"))
        sql_stored = await sql.store().get("task-0004", ctx("alice"))
        assert stored is not None and sql_stored is not None
        assert stored.version == sql_stored.version == TaskVersion(3)
        entries = await backend.redis.xrange(Keys(prefix).events("task-0004"))
        assert len(entries) == 3
        # push configs: still encrypted, readable with the key, for their owner only
        keyed = RedisPushNotificationConfigStore(backend.redis, prefix=prefix, encryption_key=key)
        configs = await keyed.get_info("task-0004", ctx("alice"))
        assert [c.url for c in configs] == ["https://hook/4"] and configs[0].token == "tok"
        assert await keyed.get_info("task-0004", ctx("bob")) == []
        with pytest.raises(DecryptionError):
            await RedisPushNotificationConfigStore(backend.redis, prefix=prefix).get_info(
                "task-0004", ctx("alice")
            )
        # CancelTask: the same answer from both (a non-terminal task, then a terminal one)
        for task_id, owner in [("task-0001", "alice"), ("task-0004", "alice")]:
            a = await _outcome(
                sql_handler.on_cancel_task(CancelTaskRequest(id=task_id), ctx(owner))
            )
            b = await _outcome(
                redis_handler.on_cancel_task(CancelTaskRequest(id=task_id), ctx(owner))
            )
            assert _cancel_view(a) == _cancel_view(b), task_id
    finally:
        await backend.aclose()


async def test_push_configs_are_re_encrypted_only_if_asked_and_survive_export_import(
    sql: Sql, real_url: str, prefix: str, tmp_path: Path
) -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    await fill(sql, n=8, key=old)
    code, out = await cli(
        sql.argv(real_url, prefix, f"--encryption-key={old.decode()}",
                 f"--redis-encryption-key={new.decode()}")
    )  # fmt: skip
    assert code == 0 and out["migrate"]["push_configs"] == 2, out
    client = connect(real_url)
    try:

        def configs(at: str, key: bytes | None) -> Any:
            store = RedisPushNotificationConfigStore(client, prefix=at, encryption_key=key)
            return store.get_info("task-0004", ctx("alice"))

        assert [c.url for c in await configs(prefix, new)] == ["https://hook/4"]
        with pytest.raises(DecryptionError):
            await configs(prefix, old)  # re-encrypted with the new key, as asked
        # export reads them with the key (in clear in the file); import encrypts them again
        dump = tmp_path / "dump.ndjson"
        argv = ["--url", real_url, "--json", f"--encryption-key={new.decode()}"]
        code, _ = await cli(["export", "--prefix", prefix, "-o", str(dump), *argv])
        assert code == 0 and '"token":"tok"' in dump.read_text()
        copy = prefix + ":copy"
        code, dry = await cli(["import", "--prefix", copy, "-i", str(dump), "--dry-run", *argv])
        assert (
            code == 0
            and dry["copied"] == 10
            and await client.exists(Keys(copy).task("task-0004")) == 0
        )
        code, done = await cli(["import", "--prefix", copy, "-i", str(dump), *argv])
        assert code == 0 and (done["copied"], done["push_configs"]) == (10, 2)
        assert [c.token for c in await configs(copy, new)] == ["tok"]
        with pytest.raises(DecryptionError):
            await configs(copy, None)  # stored encrypted
    finally:
        await client.aclose()


def _cancel_view(outcome: Any) -> Any:
    if isinstance(outcome, Task):
        return (outcome.id, outcome.status.state, len(outcome.artifacts), len(outcome.history))
    return outcome


async def _outcome(call: Any) -> Any:
    try:
        return await call
    except A2AError as e:
        return type(e).__name__


async def compare_handlers(sql_handler: Any, redis_handler: Any, made: list[Any]) -> None:
    for task_id, owner in made:
        for who in {owner, "bob"}:
            for history_length in (None, 0):
                request = GetTaskRequest(id=task_id)
                if history_length is not None:
                    request.history_length = history_length
                a = await _outcome(sql_handler.on_get_task(request, ctx(who)))
                b = await _outcome(redis_handler.on_get_task(request, ctx(who)))
                assert a == b, (task_id, who)
    after = ListTasksRequest()
    after.status_timestamp_after.FromNanoseconds(T0_NS + 120 * 1_000_000_000)
    requests = [
        ListTasksRequest(),
        ListTasksRequest(page_size=4, include_artifacts=True),
        ListTasksRequest(context_id="ctx-1", page_size=3),
        ListTasksRequest(status=TaskState.TASK_STATE_COMPLETED),
        ListTasksRequest(status=TaskState.TASK_STATE_SUBMITTED, context_id="ctx-0"),
        ListTasksRequest(page_size=5, history_length=0),
        after,
    ]
    for owner in OWNERS:
        for request in requests:
            pages = 0
            while True:
                a = await sql_handler.on_list_tasks(request, ctx(owner))
                b = await redis_handler.on_list_tasks(request, ctx(owner))
                assert a == b, (owner, request)
                pages += 1
                if not a.next_page_token:
                    break
                following = ListTasksRequest()
                following.CopyFrom(request)
                following.page_token = a.next_page_token
                request = following
            assert pages < 20


class Stop(Exception):
    pass


class StopAfter(migrate_mod.Progress):
    """Progress that interrupts the run after ``limit`` tasks (a killed migration)."""

    def __init__(self, limit: int) -> None:
        super().__init__(0, out=io.StringIO())
        self.limit = limit

    def advance(self, n: int) -> None:
        super().advance(n)
        if self.done >= self.limit:
            raise Stop


async def test_interrupted_run_resumes_second_run_copies_nothing_and_newer_is_kept(
    sql: Sql, real_url: str, prefix: str
) -> None:
    made = await fill(sql, n=18)
    source = SqlSource(sql.dsn, sql.tables, batch=5)
    client = connect(real_url)
    try:
        await source.open()
        with pytest.raises(Stop):
            await migrate_mod.migrate(source, client, prefix, progress=StopAfter(10))
        resumed = await migrate_mod.migrate(source, client, prefix)
        assert (resumed.copied, resumed.skipped, resumed.conflicts, resumed.failures) == (
            len(made) - 10, 10, 0, 0,
        )  # fmt: skip
        clear = RedisPushNotificationConfigStore(client, prefix=prefix)  # copied in clear
        assert [c.url for c in await clear.get_info("task-0008", ctx("bob"))] == ["https://hook/8"]
        again = await migrate_mod.migrate(source, client, prefix)
        assert (again.copied, again.skipped, again.events, again.push_configs) == (
            0, len(made), 0, 0,
        )  # fmt: skip

        # SQL moves on (task-0001 is WORKING at v2): the next run brings the new version and
        # appends only the new event; Redis moving on (task-0009) is a conflict, kept.
        store = sql.store()
        stored = await store.get("task-0001", ctx("alice"))
        assert stored is not None
        task = stored.task
        task.status.CopyFrom(_status(TaskState.TASK_STATE_COMPLETED, 1, 5))
        event = TaskStatusUpdateEvent(
            task_id=task.id, context_id=task.context_id, status=task.status
        )
        await store.save(task, event=event, prev_version=stored.version, context=ctx("alice"))
        redis_store = VersionedRedisTaskStore(client, prefix=prefix)
        theirs = await redis_store.get("task-0009", ctx(""))
        assert theirs is not None
        theirs.task.status.CopyFrom(_status(TaskState.TASK_STATE_WORKING, 9, 7))
        await redis_store.save(theirs.task, prev_version=theirs.version, context=ctx(""))
        third = await migrate_mod.migrate(source, client, prefix)
        assert (third.copied, third.conflicts, third.conflict_ids) == (1, 1, ["task-0009"])
        assert third.skipped == len(made) - 2 and third.events == 1
        now = await redis_store.get("task-0001", ctx("alice"))
        assert now is not None and now.version == TaskVersion(3) and now.task == task
        assert len(await client.xrange(Keys(prefix).events("task-0001"))) == 3
        kept = await redis_store.get("task-0009", ctx(""))
        assert kept is not None and kept.task == theirs.task
        checked = await migrate_mod.verify(source, client, prefix)
        assert checked.failures == 1 and checked.failed[0][0] == "task-0009"
        # --after: ids are read in order, so a run can start past a finished part
        later = await migrate_mod.migrate(source, client, prefix + ":after", after="task-0015")
        assert (later.seen, later.copied) == (2, 2)
    finally:
        await source.aclose()
        await client.aclose()


async def test_corrupt_rows_are_reported_and_skipped_dry_run_writes_nothing(
    sql: Sql, real_url: str, prefix: str
) -> None:
    made = await fill(sql, n=8)
    t = sql.tables
    async with sql.engine.begin() as conn:  # damage rows by hand (the SDK would not)
        await conn.execute(
            text(f"UPDATE {quote(sql.engine, t.tasks)} SET status = :bad WHERE id = 'task-0002'"),
            {"bad": '{"state": "NO_SUCH_STATE"}'},
        )
        await conn.execute(
            text(
                f"UPDATE {quote(sql.engine, t.events)} SET event_data = :junk "
                "WHERE task_id = 'task-0003'"
            ),
            {"junk": b"\xff\xfe not a protobuf"},
        )
    code, dry = await cli(sql.argv(real_url, prefix, "--dry-run"))
    assert code == 3 and dry["dry_run"] is True
    assert dry["migrate"]["copied"] == len(made) - 2 and dry["migrate"]["failures"] == 2
    client = connect(real_url)
    try:
        assert await client.exists(Keys(prefix).task("task-0000")) == 0  # nothing written
        code, out = await cli(sql.argv(real_url, prefix))
        assert code == 3
        counts = out["migrate"]
        assert counts["copied"] == len(made) - 2 and counts["failures"] == 2
        failed = {f["id"]: f["error"] for f in counts["failed"]}
        assert set(failed) == {"task-0002", "task-0003"}
        assert "task row" in failed["task-0002"] and "event row" in failed["task-0003"]
        assert await client.exists(Keys(prefix).task("task-0002")) == 0
        assert await client.exists(Keys(prefix).task("task-0003")) == 0
        code, out = await cli(sql.argv(real_url, prefix))
        assert code == 3 and out["migrate"]["copied"] == 0
        assert out["migrate"]["skipped"] == len(made) - 2
    finally:
        await client.aclose()


def test_migrate_usage_and_unreachable_source_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["migrate"])
    assert usage.value.code == 2
    capsys.readouterr()
    code = main(["migrate", "--from", f"sqlite+aiosqlite:///{tmp_path / 'none.db'}",
                 "--to", "redis://127.0.0.1:1/0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("a2a-redis: cannot reach Redis")
