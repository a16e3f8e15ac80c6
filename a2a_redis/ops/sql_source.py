"""Reads the a2a-sdk's SQL tables in batches, for ``a2a-redis migrate``.

The tables are those of the SDK's ``DatabaseTaskStore`` (``tasks``),
``VersionedDatabaseTaskStore`` (``task_versions``), ``DatabaseTaskEventStream``
(``task_events``) and ``DatabasePushNotificationConfigStore``
(``push_notification_configs``); each name can be overridden. Only the tasks table must
exist. Rows are converted with the SDK's own conversions (``_from_orm``), so a row reads
here as the SDK's store would read it.

Reads are keyset-paginated by task id (``WHERE id > last ORDER BY id LIMIT n``), with the
batch's versions, events and push configs in three more queries: memory is bounded by the
batch, whatever the table's size. JSON columns are read as text and parsed row by row, so
one corrupt row fails alone (:class:`SourceTask` ``error``) instead of its whole batch.
"""

from __future__ import annotations

import json
import types
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from a2a.server.events.event_queue import Event
from a2a.types.a2a_pb2 import StreamResponse, Task, TaskPushNotificationConfig

try:
    from a2a.server.cluster.database_event_stream import stream_response_to_event
    from a2a.server.tasks.database_push_notification_config_store import (
        DatabasePushNotificationConfigStore,
    )
    from a2a.server.tasks.database_task_store import DatabaseTaskStore
    from sqlalchemy import (
        BigInteger,
        Column,
        LargeBinary,
        MetaData,
        String,
        Table,
        Text,
        cast,
        func,
        inspect,
        select,
    )
    from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
except ImportError as e:  # pragma: no cover - the test extra installs them
    raise ImportError(
        "migrate needs SQLAlchemy and the database's async driver: "
        "pip install 'a2a-sdk[sqlite]' (or [postgresql], [mysql])"
    ) from e

__all__ = ["SourceTask", "SqlSource", "Tables"]


@dataclass(frozen=True)
class Tables:
    """The SDK's table names (its defaults unless overridden)."""

    tasks: str = "tasks"
    versions: str = "task_versions"
    events: str = "task_events"
    push_configs: str = "push_notification_configs"


@dataclass
class SourceTask:
    """One task row as read: the task, or ``error`` saying why it cannot be read."""

    task_id: str
    owner: str
    version: int  # 0: the row has no version (a plain DatabaseTaskStore)
    task: Task | None = None
    events: list[tuple[int, Event]] = field(default_factory=list)
    #: (owner, config): the SQL store keeps configs per owner, not only the task's owner's
    push_configs: list[tuple[str, TaskPushNotificationConfig]] = field(default_factory=list)
    error: str = ""


def _task_from_row(row: Any) -> Task:
    """The SDK's own row conversion (``DatabaseTaskStore._from_orm``) of a text-read row."""
    model = types.SimpleNamespace(
        id=row.id,
        context_id=row.context_id,
        kind=row.kind,
        owner=row.owner,
        last_updated=row.last_updated,
        status=json.loads(row.status) if row.status is not None else None,
        artifacts=json.loads(row.artifacts) if row.artifacts is not None else None,
        history=json.loads(row.history) if row.history is not None else None,
        task_metadata=json.loads(row.metadata) if row.metadata is not None else None,
        protocol_version=row.protocol_version,
    )
    if not isinstance(model.status, dict):
        raise ValueError("status is not a JSON object")
    converter = types.SimpleNamespace(model_to_core_conversion=None)
    task: Task = DatabaseTaskStore._from_orm(converter, model)  # type: ignore[arg-type]
    return task


class SqlSource:
    """The SDK's SQL tables behind one SQLAlchemy async URL, read in batches.

    Args:
        dsn: ``sqlite+aiosqlite:///path``, ``postgresql+asyncpg://...``, ``mysql+aiomysql://...``.
        tables: Table names.
        encryption_key: The SQL push-config store's Fernet key, if it encrypted them.
        batch: Tasks per read.
    """

    def __init__(
        self,
        dsn: str,
        tables: Tables | None = None,
        *,
        encryption_key: str | bytes | None = None,
        batch: int = 500,
    ) -> None:
        self.engine: AsyncEngine = create_async_engine(dsn)
        self.tables = tables or Tables()
        self.batch = batch
        meta = MetaData()
        t = self.tables
        self._tasks = Table(
            t.tasks, meta,
            Column("id", String(36), primary_key=True), Column("context_id", String(36)),
            Column("kind", String(16)), Column("owner", String(255)),
            Column("last_updated", Text), Column("status", Text), Column("artifacts", Text),
            Column("history", Text), Column("metadata", Text),
            Column("protocol_version", String(16)),
        )  # fmt: skip
        self._versions = Table(
            t.versions, meta,
            Column("task_id", String(36), primary_key=True), Column("owner", String(255)),
            Column("version", BigInteger),
        )  # fmt: skip
        self._events = Table(
            t.events, meta,
            Column("seq", BigInteger, primary_key=True), Column("task_id", String(36)),
            Column("owner", String(255)), Column("task_version", BigInteger),
            Column("event_data", LargeBinary),
        )  # fmt: skip
        self._push = Table(
            t.push_configs, meta,
            Column("task_id", String(36), primary_key=True),
            Column("config_id", String(255), primary_key=True),
            Column("config_data", LargeBinary), Column("owner", String(255)),
            Column("protocol_version", String(16)),
        )  # fmt: skip
        fernet = None
        if encryption_key:
            from cryptography.fernet import Fernet

            fernet = Fernet(encryption_key)
        self._push_reader = types.SimpleNamespace(model_to_core_conversion=None, _fernet=fernet)
        self._push_reader._parse_config = types.MethodType(
            DatabasePushNotificationConfigStore._parse_config,
            self._push_reader,
        )
        self.present: dict[str, bool] = {}

    async def open(self) -> None:
        """Find which of the tables exist; the tasks table must."""
        async with self.engine.connect() as conn:
            names = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        for name in (self.tables.tasks, self.tables.versions, self.tables.events):
            self.present[name] = name in names
        self.present[self.tables.push_configs] = self.tables.push_configs in names
        if not self.present[self.tables.tasks]:
            raise ValueError(f"no table {self.tables.tasks!r} in the source database")

    async def aclose(self) -> None:
        """Close the engine's connections."""
        await self.engine.dispose()

    async def count(self) -> int:
        """How many task rows there are."""
        async with self.engine.connect() as conn:
            return int(
                (await conn.execute(select(func.count()).select_from(self._tasks))).scalar_one()
            )

    async def batches(self, after: str = "") -> AsyncIterator[list[SourceTask]]:
        """Every task row in id order, ``batch`` at a time, with versions, events, configs."""
        t = self._tasks
        columns = [
            t.c.id, t.c.context_id, t.c.kind, t.c.owner, t.c.protocol_version,
            cast(t.c.last_updated, Text).label("last_updated"),
            *(cast(c, Text).label(c.name) for c in (t.c.status, t.c.artifacts, t.c.history)),
            cast(t.c.metadata, Text).label("metadata"),
        ]  # fmt: skip
        while True:
            async with self.engine.connect() as conn:
                query = select(*columns).where(t.c.id > after).order_by(t.c.id).limit(self.batch)
                rows = (await conn.execute(query)).all()
                if not rows:
                    return
                ids = [r.id for r in rows]
                versions = await self._versions_of(conn, ids)
                events = await self._events_of(conn, ids)
                configs = await self._configs_of(conn, ids)
            out: list[SourceTask] = []
            for row in rows:
                owner = row.owner or ""
                item = SourceTask(row.id, owner, versions.get(row.id, 0))
                try:
                    item.task = _task_from_row(row)
                except Exception as e:
                    item.error = f"undecodable task row: {type(e).__name__}: {e}"[:300]
                item.events, bad = events.get(row.id, ([], ""))
                item.error = item.error or bad
                item.push_configs, bad = configs.get(row.id, ([], ""))
                item.error = item.error or bad
                out.append(item)
            yield out
            after = ids[-1]

    async def _versions_of(self, conn: Any, ids: Sequence[str]) -> dict[str, int]:
        if not self.present[self.tables.versions]:
            return {}
        v = self._versions
        rows = await conn.execute(select(v.c.task_id, v.c.version).where(v.c.task_id.in_(ids)))
        return {r.task_id: int(r.version) for r in rows}

    async def _events_of(
        self, conn: Any, ids: Sequence[str]
    ) -> dict[str, tuple[list[tuple[int, Event]], str]]:
        if not self.present[self.tables.events]:
            return {}
        e = self._events
        query = (
            select(e.c.seq, e.c.task_id, e.c.task_version, e.c.event_data)
            .where(e.c.task_id.in_(ids))
            .order_by(e.c.task_id, e.c.seq)
        )
        out: dict[str, tuple[list[tuple[int, Event]], str]] = {}
        for row in await conn.execute(query):
            events, bad = out.setdefault(row.task_id, ([], ""))
            if bad:
                continue
            try:
                event = stream_response_to_event(StreamResponse.FromString(row.event_data))
            except Exception as err:
                out[row.task_id] = (events, f"undecodable event row seq {row.seq}: {err}"[:300])
                continue
            version = int(row.task_version)
            if not events or version > events[-1][0]:  # strictly increasing, as logged
                events.append((version, event))
        return out

    async def _configs_of(
        self, conn: Any, ids: Sequence[str]
    ) -> dict[str, tuple[list[tuple[str, TaskPushNotificationConfig]], str]]:
        if not self.present[self.tables.push_configs]:
            return {}
        p = self._push
        query = select(p).where(p.c.task_id.in_(ids)).order_by(p.c.task_id, p.c.config_id)
        out: dict[str, tuple[list[tuple[str, TaskPushNotificationConfig]], str]] = {}
        for row in await conn.execute(query):
            key = row.task_id
            configs, bad = out.setdefault(key, ([], ""))
            if bad:
                continue
            try:
                config = DatabasePushNotificationConfigStore._from_orm(
                    self._push_reader,  # type: ignore[arg-type]
                    row,
                )
            except Exception as err:
                why = f"undecodable push config {row.config_id!r}: {err}"[:300]
                out[key] = (configs, why)
                continue
            configs.append((row.owner or "", config))
        return out
