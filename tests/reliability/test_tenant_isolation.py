"""Tenant isolation (issue 6, section 8): random operation sequences across owners.

Hypothesis draws sequences of operations by four owners -- the unauthenticated user (the
SDK's ``ServerCallContext()``, owner ``""``), ``alice``, ``bob`` and ``alice:*`` (a name
that shares a prefix with ``alice`` and carries a key separator and a glob) -- sent
through the SDK's request handlers of two replicas (two ``RedisBackend``s on one server,
one prefix), with the user taken from the ``ServerCallContext``. The operations: send a
message (a new task that completes, stops at input-required, or is held working until the
end of the example; or a follow-up naming a task), get, list (no filter, by context, by
state), cancel, subscribe, and the four push-config calls. Targets are drawn from every
task created so far, whoever owns it, plus an id that never existed, so most operations
cross owners.

A model records who owns what. The checks:

* an operation on another owner's task (or a missing one) raises the SDK's
  ``TaskNotFoundError``, and the target's record, push configs and event log are
  byte-for-byte unchanged afterwards (read from Redis directly);
* an owner's operations on their own tasks behave as documented (the state they see is
  the stored one), and ``ListTasks`` returns exactly the owner's tasks matching the filter;
* after the sequence: every task is visible to its owner only, ``get_info_for_dispatch``
  holds exactly the configs the owner set, and every ``P:{o:OWNER}:*`` index of an owner
  names only that owner's tasks (ZRANGE, checked against each record's owner field).

The V2 handler (cluster mode) and the legacy handler (``legacy=True``: ``RedisTaskStore``
and ``RedisQueueManager``) are each tested. With the legacy handler an owner's cancel of
their own task goes to the replica running it (a legacy cancel elsewhere does not stop
the agent: documented in the README); cross-owner cancels go anywhere.

Each example has its own sub-prefix of the test's prefix (deleted at teardown). The
soak variant (``make soak``) runs many more and longer sequences.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from a2a.server.context import ServerCallContext
from a2a.server.events.event_queue import Event
from a2a.server.request_handlers import RequestHandler
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTasksRequest,
    Message,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskPushNotificationConfig,
    TaskState,
)
from a2a.utils.errors import (
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from a2a_redis import RedisBackend
from a2a_redis.log.codec import TERMINAL_STATES, member_task_id
from a2a_redis.log.keys import Keys
from a2a_redis.stores.push_config_store import RedisPushNotificationConfigStore
from tests.helpers import (
    ROOT,
    ScriptedAgent,
    Tap,
    background_settled,
    connect,
    ctx,
    push_card,
    push_config,
    user_message,
)

S = TaskState
GUARD = 30.0  # seconds: a hang guard only

# The unauthenticated user ("") comes from the SDK's default ServerCallContext.
OWNERS = ("", "alice", "bob", "alice:*")
CONTEXTS = ("c1", "c2")  # shared by every owner: context ids do not scope anything
CONFIG_IDS = ("p1", "p2")
LIST_STATES = (
    S.TASK_STATE_WORKING,
    S.TASK_STATE_INPUT_REQUIRED,
    S.TASK_STATE_COMPLETED,
    S.TASK_STATE_CANCELED,
)
MISSING = "no-such-task"


def call_context(owner: str) -> ServerCallContext:
    return ServerCallContext() if owner == "" else ctx(owner)


# -- operations ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Send:
    actor: int
    via: int
    kind: str  # "complete" | "input" | "hold"
    context: int  # -1: none (the SDK makes one)
    follow: int | None  # None: a new task; else a target (see Model.target)
    push: bool  # carry a push config in the request's configuration


@dataclass(frozen=True)
class Call:
    """Get, Cancel, Subscribe, SetPush, GetPush, ListPush or DeletePush on a target."""

    what: str
    actor: int
    via: int
    target: int | None  # None: an id that never existed
    config: int = 0


@dataclass(frozen=True)
class List:
    actor: int
    via: int
    by: str  # "all" | "context" | "state"
    context: int
    state: int


Op = Send | Call | List

actors = st.integers(0, len(OWNERS) - 1)
vias = st.integers(0, 1)
targets = st.one_of(st.none(), st.integers(0, 63))
ops_strategy = st.one_of(
    st.builds(
        Send,
        actors,
        vias,
        st.sampled_from(("complete", "input", "hold")),
        st.integers(-1, len(CONTEXTS) - 1),
        st.one_of(st.none(), st.none(), targets),
        st.booleans(),
    ),
    st.builds(
        Call,
        st.sampled_from(
            ("get", "cancel", "subscribe", "set_push", "get_push", "list_push", "delete_push")
        ),
        actors,
        vias,
        targets,
        st.integers(0, len(CONFIG_IDS) - 1),
    ),
    st.builds(
        List,
        actors,
        vias,
        st.sampled_from(("all", "context", "state")),
        st.integers(0, len(CONTEXTS) - 1),
        st.sampled_from(LIST_STATES),
    ),
)


# -- the model and the replicas --------------------------------------------------------------
@dataclass
class TaskInfo:
    id: str
    owner: str
    context_id: str
    origin: int  # the replica whose handler ran its last message
    tap: Tap | None = None  # the stream of a held task


@dataclass
class World:
    redis: aioredis.Redis
    keys: Keys
    handlers: list[RequestHandler]
    agent: ScriptedAgent
    legacy: bool
    tasks: list[TaskInfo] = field(default_factory=list)
    # (task id, owner) -> {config id: config}, in the order last set
    configs: dict[tuple[str, str], dict[str, TaskPushNotificationConfig]] = field(
        default_factory=dict
    )
    taps: list[Tap] = field(default_factory=list)

    def target(self, index: int | None) -> TaskInfo | None:
        if index is None or not self.tasks:
            return None
        return self.tasks[index % len(self.tasks)]

    async def stored_state(self, task_id: str) -> int:
        raw = await self.redis.hget(self.keys.task(task_id), "s")
        assert raw is not None, task_id
        return int(raw)

    async def snapshot(self, task_id: str) -> tuple[object, ...]:
        """Everything stored for a task: record, push configs, versioned event log."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.task(task_id))
            pipe.hgetall(self.keys.push_configs(task_id))
            pipe.xrange(self.keys.events(task_id))
            record, push, entries = await pipe.execute()
        log = [(eid, fields) for eid, fields in entries if b"e" in fields]  # not close marks
        return record, push, log

    def remember_config(self, owner: str, config: TaskPushNotificationConfig) -> None:
        mine = self.configs.setdefault((config.task_id, owner), {})
        mine.pop(config.id, None)
        mine[config.id] = config


def owner_config(task_id: str, config_id: str, owner: str) -> TaskPushNotificationConfig:
    return push_config(task_id, config_id, f"token-of-{owner or 'anon'}", f"cred-{owner}")


def message(kind: str, *, task_id: str = "", context_id: str = "") -> Message:
    text, message_id = f"{kind} request", f"m-{next(_IDS)}"
    return user_message(text, task_id=task_id, context_id=context_id, message_id=message_id)


_IDS = itertools.count()
_EXAMPLE = itertools.count()


async def expect_not_found(world: World, victim: TaskInfo | None, action: Any) -> None:
    """``action()`` is refused with TaskNotFoundError and changes nothing of ``victim``."""
    before = await world.snapshot(victim.id) if victim else None
    with pytest.raises(TaskNotFoundError):
        await asyncio.wait_for(action(), GUARD)
    if victim is not None:
        assert await world.snapshot(victim.id) == before, f"{victim.id} changed"


async def first_event(events: AsyncGenerator[Event, None]) -> Event:
    async with aclosing(events) as it:
        return await asyncio.wait_for(anext(it), GUARD)


# -- applying one operation ------------------------------------------------------------------
async def apply_send(world: World, op: Send) -> None:
    owner = OWNERS[op.actor]
    context = call_context(owner)
    handler = world.handlers[op.via]
    request = SendMessageRequest()
    if op.follow is not None:
        victim = world.target(op.follow)
        if victim is None or victim.owner != owner:
            task_id = victim.id if victim else MISSING
            request.message.CopyFrom(message(op.kind, task_id=task_id))
            if op.push:
                request.configuration.task_push_notification_config.CopyFrom(
                    owner_config(task_id, "sent", owner)
                )
            await expect_not_found(world, victim, lambda: handler.on_message_send(request, context))
            return
        if await world.stored_state(victim.id) != S.TASK_STATE_INPUT_REQUIRED or op.kind == "hold":
            return  # an owner's follow-up is tested only where it is valid
        request.message.CopyFrom(message(op.kind, task_id=victim.id, context_id=victim.context_id))
        existing: TaskInfo | None = victim
    else:
        context_id = CONTEXTS[op.context] if op.context >= 0 else ""
        request.message.CopyFrom(message(op.kind, context_id=context_id))
        existing = None
    if op.push:
        request.configuration.task_push_notification_config.CopyFrom(
            owner_config("", "sent", owner)
        )
    if op.kind == "hold":
        tap = Tap(handler.on_message_send_stream(request, context))
        world.taps.append(tap)
        head = await tap.until(3)  # Task, WORKING, the artifact: stored, then yielded
        task = head[0]
        assert isinstance(task, Task), head
        info = TaskInfo(task.id, owner, task.context_id, op.via, tap)
        expected = S.TASK_STATE_WORKING
    else:
        result = await asyncio.wait_for(handler.on_message_send(request, context), GUARD)
        assert isinstance(result, Task), result
        expected = S.TASK_STATE_COMPLETED if op.kind == "complete" else S.TASK_STATE_INPUT_REQUIRED
        assert result.status.state == expected
        info = existing or TaskInfo(result.id, owner, result.context_id, op.via)
        info.origin = op.via
        task = result
    if existing is None:
        if op.context >= 0:
            assert task.context_id == CONTEXTS[op.context]
        world.tasks.append(info)
    assert await world.stored_state(info.id) == expected
    if op.push:
        world.remember_config(owner, owner_config(info.id, "sent", owner))


async def apply_list(world: World, op: List) -> None:
    owner = OWNERS[op.actor]
    request = ListTasksRequest()
    if op.by == "context":
        request.context_id = CONTEXTS[op.context]
    elif op.by == "state":
        request.status = op.state
    page = await asyncio.wait_for(
        world.handlers[op.via].on_list_tasks(request, call_context(owner)), GUARD
    )
    want = set()
    for info in world.tasks:
        if info.owner != owner:
            continue
        if op.by == "context" and info.context_id != request.context_id:
            continue
        if op.by == "state" and await world.stored_state(info.id) != op.state:
            continue
        want.add(info.id)
    got = [t.id for t in page.tasks]
    assert sorted(got) == sorted(want), (owner, op)
    assert page.total_size == len(want)


async def apply_call(world: World, op: Call) -> None:
    owner = OWNERS[op.actor]
    victim = world.target(op.target)
    task_id = victim.id if victim else MISSING
    context = call_context(owner)
    handler = world.handlers[op.via]
    config_id = CONFIG_IDS[op.config]
    actions = {
        "get": lambda: handler.on_get_task(GetTaskRequest(id=task_id), context),
        "cancel": lambda: handler.on_cancel_task(CancelTaskRequest(id=task_id), context),
        "subscribe": lambda: first_event(
            handler.on_subscribe_to_task(SubscribeToTaskRequest(id=task_id), context)
        ),
        "set_push": lambda: handler.on_create_task_push_notification_config(
            owner_config(task_id, config_id, owner), context
        ),
        "get_push": lambda: handler.on_get_task_push_notification_config(
            GetTaskPushNotificationConfigRequest(task_id=task_id, id=config_id), context
        ),
        "list_push": lambda: handler.on_list_task_push_notification_configs(
            ListTaskPushNotificationConfigsRequest(task_id=task_id), context
        ),
        "delete_push": lambda: handler.on_delete_task_push_notification_config(
            DeleteTaskPushNotificationConfigRequest(task_id=task_id, id=config_id), context
        ),
    }
    if victim is None or victim.owner != owner:
        await expect_not_found(world, victim, actions[op.what])
        return
    if op.what == "cancel":
        await own_cancel(world, victim, context, op.via)
        return
    state = await world.stored_state(task_id)
    mine = world.configs.get((task_id, owner), {})
    if op.what == "get":
        task = await asyncio.wait_for(actions["get"](), GUARD)
        assert task is not None and task.id == task_id and task.status.state == state
    elif op.what == "subscribe":
        if state in TERMINAL_STATES:
            with pytest.raises(UnsupportedOperationError):
                await actions["subscribe"]()
        else:
            first = await actions["subscribe"]()
            assert isinstance(first, Task) and first.id == task_id
    elif op.what == "set_push":
        stored = await asyncio.wait_for(actions["set_push"](), GUARD)
        assert stored == owner_config(task_id, config_id, owner)
        world.remember_config(owner, stored)
    elif op.what == "get_push":
        if config_id in mine:
            assert await asyncio.wait_for(actions["get_push"](), GUARD) == mine[config_id]
        else:
            with pytest.raises(TaskNotFoundError):
                await actions["get_push"]()
    elif op.what == "list_push":
        listed = await asyncio.wait_for(actions["list_push"](), GUARD)
        assert list(listed.configs) == list(mine.values())
    else:
        await asyncio.wait_for(actions["delete_push"](), GUARD)
        mine.pop(config_id, None)


async def own_cancel(world: World, info: TaskInfo, context: ServerCallContext, via: int) -> None:
    """An owner cancels their own task: CANCELED if it was live, else not cancelable."""
    if world.legacy:
        via = info.origin  # a legacy cancel stops the agent only where it runs
    handler = world.handlers[via]
    if await world.stored_state(info.id) in TERMINAL_STATES:
        with pytest.raises(TaskNotCancelableError):
            await asyncio.wait_for(
                handler.on_cancel_task(CancelTaskRequest(id=info.id), context), GUARD
            )
        return
    result = await asyncio.wait_for(
        handler.on_cancel_task(CancelTaskRequest(id=info.id), context), GUARD
    )
    assert result is not None and result.status.state == S.TASK_STATE_CANCELED
    if info.tap is not None:
        world.agent.gate(info.id).set()
        if world.legacy:
            # The SDK's legacy handler cancels the agent but never ends the original
            # stream (with its in-memory queue manager too): stop reading it.
            await info.tap.close()
        else:  # the held agent goes on, finds the task canceled, and its stream ends
            await info.tap.finish()
        info.tap = None
    assert await world.stored_state(info.id) == S.TASK_STATE_CANCELED


async def apply(world: World, op: Op) -> None:
    if isinstance(op, Send):
        await apply_send(world, op)
    elif isinstance(op, List):
        await apply_list(world, op)
    else:
        await apply_call(world, op)


# -- the final checks --------------------------------------------------------------------------
async def final_check(world: World, backend: RedisBackend) -> None:
    for info in world.tasks:
        for owner in OWNERS:
            seen = await backend.task_store.get(info.id, call_context(owner))
            assert (seen is not None) == (owner == info.owner), (info.id, owner)
        dispatch = await backend.push_config_store.get_info_for_dispatch(info.id)
        want = list(world.configs.get((info.id, info.owner), {}).values())
        assert sorted(dispatch, key=lambda c: c.id) == sorted(want, key=lambda c: c.id)
    await check_indexes(world.redis, world.keys, {t.id: t.owner for t in world.tasks})


async def check_indexes(redis: aioredis.Redis, keys: Keys, owners: dict[str, str]) -> None:
    """Every owner's index keys name only that owner's tasks; no index of anyone else."""
    bases = {keys.index(owner).removesuffix(":all"): owner for owner in OWNERS}
    pattern = keys.scan_pattern().removesuffix("*") + "{o:*"
    found = 0
    async for raw in redis.scan_iter(match=pattern, count=500):
        key = raw.decode()
        base = key[: key.index("}") + 1]
        assert base in bases, f"index of an unknown owner: {key}"
        owner = bases[base]
        if key.endswith(":expiring"):
            continue
        for member in await redis.zrange(key, 0, -1):
            task_id = member_task_id(key, member)
            assert owners.get(task_id) == owner, f"{key} names {task_id!r} of another owner"
            stored = await redis.hget(keys.task(task_id), "o")
            assert stored == owner.encode(), (key, task_id, stored)
            found += 1
    assert found >= len(owners)  # every task is in at least its owner's "all" index


async def quiesce(handler: RequestHandler) -> None:
    """Close a V2 handler; let a legacy handler's background cleanups finish."""
    closer = getattr(handler, "aclose", None)
    if closer is not None:
        await closer()
        return
    await background_settled(handler)  # the legacy handler has no aclose


# -- the tests ---------------------------------------------------------------------------------
async def run_sequence(
    url: str, prefix: str, redis: aioredis.Redis, ops: list[Op], *, legacy: bool
) -> None:
    sub = f"{prefix}:{next(_EXAMPLE)}"
    agent = ScriptedAgent()
    backends = [RedisBackend(connect(url), prefix=sub) for _ in range(2)]
    card = push_card()
    # Who reaches which stored config is the subject: no delivery (tests/push covers it).
    handlers = [b.request_handler(agent, card, legacy=legacy, push_sender=None) for b in backends]
    world = World(redis, Keys(sub), handlers, agent, legacy)
    try:
        for op in ops:
            await apply(world, op)
        await final_check(world, backends[0])
    finally:
        agent.release_all()
        for tap in world.taps:
            if not tap.task.done():
                await tap.finish()
        for handler in handlers:
            await asyncio.wait_for(quiesce(handler), GUARD)
        for backend in backends:
            await backend.aclose()
            await backend.redis.aclose()


CALLS = ("get", "subscribe", "set_push", "get_push", "list_push", "delete_push", "cancel")
ALICE, BOB, ANON, ALICE_STAR = 1, 2, 0, 3
#: Run every time (Phase.explicit): each call by each kind of stranger on a live task held
#: on the other replica, an input-required task and a completed one; cross-owner
#: follow-ups (with a push config); every listing; then the owners' own calls.
EXPLICIT: list[Op] = [
    Send(ALICE, 0, "hold", 0, None, True),  # task 0: alice's, live on replica 0
    Send(BOB, 1, "input", 0, None, True),  # task 1: bob's, input-required, same context
    Send(ANON, 0, "complete", 1, None, False),  # task 2: the unauthenticated user's
    Send(ALICE_STAR, 1, "hold", 0, None, False),  # task 3: "alice:*"'s, live on replica 1
    Call("set_push", ALICE, 1, 0, 0),
    Call("set_push", BOB, 0, 1, 1),
    *[
        Call(what, actor, via, target, config)
        for what in CALLS
        for actor, via, target in (
            (BOB, 1, 0),
            (ALICE_STAR, 0, 0),
            (ANON, 1, 1),
            (ALICE, 0, 2),
            (ALICE, 0, 3),
            (ANON, 1, None),
        )
        for config in (0, 1)
    ],
    Send(BOB, 0, "complete", -1, 0, True),
    Send(ALICE, 1, "complete", -1, 1, True),
    Send(ALICE_STAR, 1, "input", 0, 2, False),
    *[
        List(actor, via, by, 0, state)
        for actor in range(4)
        for via in (0, 1)
        for by in ("all", "context")
        for state in LIST_STATES[:1]
    ],
    *[List(actor, 0, "state", 0, state) for actor in range(4) for state in LIST_STATES],
    Call("get_push", ALICE, 0, 0, 0),
    Call("list_push", ALICE, 1, 0, 0),
    Call("subscribe", ALICE, 1, 0),  # her own live task, from the other replica
    Call("subscribe", BOB, 0, 1),
    Send(BOB, 0, "complete", -1, 1, False),  # bob's own follow-up, on the other replica
    Call("cancel", ALICE, 1, 0),  # her own live task, from the other replica
    Call("cancel", ALICE_STAR, 1, 3),
    Call("cancel", ANON, 0, 2),  # completed: not cancelable
    Call("delete_push", ALICE, 0, 0, 0),
    Call("list_push", ALICE, 0, 0),
    *[List(actor, 1, "state", 0, state) for actor in range(4) for state in LIST_STATES],
]

ops_lists = st.lists(ops_strategy, min_size=1, max_size=25)
HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("legacy", [False, True], ids=["v2", "legacy"])
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=HEALTH,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
@given(ops=ops_lists)
@example(ops=EXPLICIT)
async def test_no_owner_reaches_another_owners_tasks(
    real_url: str, real_redis: aioredis.Redis, prefix: str, legacy: bool, ops: list[Op]
) -> None:
    await run_sequence(real_url, prefix, real_redis, ops, legacy=legacy)


@pytest.mark.soak
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("legacy", [False, True], ids=["v2", "legacy"])
@settings(max_examples=400, deadline=None, suppress_health_check=HEALTH)
@given(ops=st.lists(ops_strategy, min_size=10, max_size=60))
async def test_no_owner_reaches_another_owners_tasks_soak(
    real_url: str, real_redis: aioredis.Redis, prefix: str, legacy: bool, ops: list[Op]
) -> None:
    await run_sequence(real_url, prefix, real_redis, ops, legacy=legacy)


# -- push configs of several owners on one task: the store's own scoping ----------------------
@pytest.mark.parametrize("encrypted", [False, True], ids=["clear", "encrypted"])
async def test_push_configs_are_scoped_and_only_dispatch_reads_across_owners(
    redis: aioredis.Redis, prefix: str, encrypted: bool
) -> None:
    """Through the handlers only a task's owner can set configs on it; the store itself
    keeps one set per (task, owner), as the SDK's stores do. Each owner reads, lists and
    deletes only their own, even with the same config id; ``get_info_for_dispatch`` (the
    push sender's call, with no user) is the one read across owners, and is documented so.
    """
    from cryptography.fernet import Fernet

    store = RedisPushNotificationConfigStore(
        redis, prefix=prefix, encryption_key=Fernet.generate_key() if encrypted else None
    )
    task_id = "t"
    configs = {owner: owner_config(task_id, "same-id", owner) for owner in OWNERS}
    for owner in OWNERS:
        await store.set_info(task_id, configs[owner], call_context(owner))
    extra = owner_config(task_id, "alice-only", "alice")
    await store.set_info(task_id, extra, call_context("alice"))

    for owner in OWNERS:
        mine = [configs[owner], extra] if owner == "alice" else [configs[owner]]
        assert await store.get_info(task_id, call_context(owner)) == mine
    assert await store.get_info(task_id, call_context("mallory")) == []
    assert await store.get_info_for_dispatch(task_id) == [*configs.values(), extra]

    await store.delete_info(task_id, call_context("bob"), "same-id")
    await store.delete_info(task_id, call_context("alice:*"))  # all of its configs
    assert await store.get_info(task_id, call_context("bob")) == []
    assert await store.get_info(task_id, call_context("alice")) == [configs["alice"], extra]
    assert await store.get_info(task_id, call_context("")) == [configs[""]]
    assert await store.get_info_for_dispatch(task_id) == [configs[""], configs["alice"], extra]

    doc = RedisPushNotificationConfigStore.get_info_for_dispatch.__doc__ or ""
    assert "every owner" in doc.lower()
    readme = (ROOT / "README.md").read_text()
    assert "get_info_for_dispatch" in readme.split("## Isolation and secrets")[1]
