"""Differential test: our plain ``TaskStore`` against the SDK's ``InMemoryTaskStore``.

Hypothesis generates sequences of saves (upserts), deletes, gets and ListTasks calls over
several owners (the empty owner included), context ids and ids with odd characters, every
``TaskState`` and a small pool of timestamps (so that ties are common; no timestamp,
negative, zero, 2**62 and the limits of ``Timestamp`` included). Each operation goes to both
stores and the answers must be equal: the task of a get, and for a list the page (ids in
order and the full tasks), ``total_size``, ``page_size``, ``next_page_token`` (the exact
string), every page reached by following the tokens, and the error (``InvalidParamsError``)
when one is raised. Page tokens are drawn as none, cursors from the pools (timestamps
beyond any Timestamp included), legacy (first-task-id) tokens of tasks inside and outside
the filtered result, tokens returned earlier in the sequence (so they are reused after
later writes), crafted cursors and garbage.

Task ids are owner-specific in the generated operations: an id is unique per prefix in our
store but per owner in the SDK's, a documented difference shown by its own test below.
The other deliberate difference: our store refuses a save that would change a stored
terminal state (``TerminalStateError``; A2A tasks in a terminal state are final), which the
SDK's store accepts. Such a save is checked to be exactly that case and is not applied to
the oracle (``tests/stores/test_terminal_state.py`` tests the rule itself).

Each Hypothesis example gets a fresh sub-prefix under the fixture's ``prefix`` (cleaned at
teardown) and a fresh ``InMemoryTaskStore``. pytest-asyncio runs the async ``@given`` test's
examples on the test's event loop, the one the ``redis`` fixture's client is bound to.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import pytest
import redis.asyncio as aioredis
from a2a.server.context import ServerCallContext
from a2a.server.tasks import InMemoryTaskStore
from a2a.server.tasks.task_store import TaskStore
from a2a.types.a2a_pb2 import ListTasksRequest, ListTasksResponse, TaskState
from a2a.utils.errors import InvalidParamsError
from a2a.utils.task import ListTasksCursor, encode_list_tasks_cursor, encode_page_token
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from a2a_redis.errors import TaskOwnedElsewhereError, TerminalStateError
from a2a_redis.log.codec import TERMINAL_STATES
from a2a_redis.stores.task_store import VersionedRedisTaskStore
from tests.helpers import ctx, make_task

# -- pools -------------------------------------------------------------------------------------
OWNERS = ("", "alice", "b:{o}*", "ü")
CONTEXTS = ("", "ctx", "c:1", "{c}", "*", "ü", "c🙂")
# Owner 0's "" name is the empty task id; other names become f"{owner}/{name}".
NAMES = ("a", "b", "A", "a:b", "{x}", "*", "a b", "%41", "é", "a\x00", "\ue000", "🙂", "")
STATES = tuple(sorted(TaskState.values()))

MIN_TS = -62_135_596_800 * 10**9  # 0001-01-01T00:00:00Z, the smallest Timestamp
MAX_TS = 253_402_300_799 * 10**9 + 999_999_999  # 9999-12-31T23:59:59.999999999Z
TIMESTAMPS = (None, MIN_TS, -(10**9) - 1, -1, 0, 1, 10**9, 2**62, MAX_TS)
# status_timestamp_after: the pool and its neighbours, to hit both sides of ">=".
AFTER = tuple(
    sorted(
        {
            t + d
            for t in TIMESTAMPS
            if t is not None
            for d in (-1, 0, 1)
            if MIN_TS <= t + d <= MAX_TS
        }
    )
)
# Cursor positions: the pool, and (clients may send any integer) beyond Timestamp's range, at
# and past the ends of the 128-bit offset the index members encode.
CURSOR_TS = (*TIMESTAMPS, 2**100, -(2**100), 2**127 - 1, -(2**127), 2**127, -(2**127) - 1, 2**200)
PAGE_SIZES = (0, 1, 2, 3, 5, 50, 100)  # 0: the default (50); the handler allows 1..100
RAW_TOKENS = (
    "!!!",
    "not a token",
    "AA==",  # legacy token of "\x00", which no task has
    encode_page_token('{"ts":1}'),  # JSON, but not a cursor
    encode_list_tasks_cursor(ListTasksCursor(timestamp_ns=1, task_id="")),  # empty id
    # Lone surrogates: JSON can carry them, task ids cannot.
    encode_list_tasks_cursor(ListTasksCursor(timestamp_ns=None, task_id="1/\ud800")),
    encode_list_tasks_cursor(ListTasksCursor(timestamp_ns=0, task_id="1/\udfff")),
)

CONTEXTS_BY_OWNER = [ctx(o) for o in OWNERS]
_EXAMPLE = itertools.count()


def task_id(owner: int, name: str) -> str:
    return "" if owner == 0 and name == "" else f"{owner}/{name}"


# -- operations ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Save:
    owner: int
    name: str
    context_id: str
    state: int
    ts_ns: int | None


@dataclass(frozen=True)
class Delete:
    owner: int
    task_owner: int | None  # whose id; None: the caller's own
    name: str


@dataclass(frozen=True)
class Get:
    owner: int
    task_owner: int | None
    name: str


@dataclass(frozen=True)
class CursorToken:
    ts_ns: int | None
    task_owner: int
    name: str


@dataclass(frozen=True)
class LegacyToken:
    task_owner: int
    name: str


@dataclass(frozen=True)
class LegacyOfMatch:
    """The legacy token of the k-th task (mod n) of the caller's tasks, per the oracle.

    Of the filtered result, or of all the caller's tasks (which the filters may exclude).
    """

    k: int
    filtered: bool


@dataclass(frozen=True)
class SeenToken:
    """The k-th (mod n) next_page_token returned earlier in the sequence."""

    k: int


@dataclass(frozen=True)
class RawToken:
    token: str


Token = CursorToken | LegacyToken | LegacyOfMatch | SeenToken | RawToken | None


@dataclass(frozen=True)
class List:
    owner: int
    context_id: str
    status: int
    after: int | None
    page_size: int
    token: Token


Op = Save | Delete | Get | List

T = TypeVar("T")


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """Draw from each strategy with the given relative weight.

    ``one_of`` picks its branches uniformly but drops repeated (identical) ones: repeats are
    made distinct with an identity ``map``.
    """
    return st.one_of([s.map(_same) for weight, s in choices for _ in range(weight)])


def _same(value: T) -> T:
    return value


# Mostly one owner, so that listings are long enough to page through and to tie.
owners = st.sampled_from((1, 1, 1, 1, 1, 0, 2, 3))
names = st.sampled_from(NAMES)
task_owners = st.none() | owners  # None: the caller's own id
tokens: st.SearchStrategy[Token] = weighted(
    (3, st.none()),
    (1, st.builds(CursorToken, st.sampled_from(CURSOR_TS), owners, names)),
    (1, st.builds(LegacyToken, owners, names)),
    (1, st.builds(LegacyOfMatch, st.integers(0, 20), st.booleans())),
    (2, st.builds(SeenToken, st.integers(0, 20))),
    (1, st.builds(RawToken, st.sampled_from(RAW_TOKENS))),
)
saves = st.builds(
    Save,
    owners,
    names,
    st.sampled_from(CONTEXTS),
    st.sampled_from(STATES),
    st.sampled_from(TIMESTAMPS),
)
# Weighted towards no filter ("", 0, None) and small pages, so that lists often span pages.
lists = st.builds(
    List,
    owners,
    st.sampled_from(("",) * 8 + (*CONTEXTS, "unused")),
    st.sampled_from((0,) * 9 + STATES),
    st.none() | st.sampled_from(AFTER),
    st.sampled_from((1, 2, 3) * 2 + PAGE_SIZES),
    tokens,
)
one_op = weighted(
    (4, saves),  # lists need tasks to say much
    (1, st.builds(Delete, owners, task_owners, names)),
    (1, st.builds(Get, owners, task_owners, names)),
    (2, lists),
)
# A list of runs of operations, flattened: about 30 operations on average (a plain st.lists
# averages about 5), and it still shrinks by deleting runs and operations.
ops_strategy = st.lists(st.lists(one_op, min_size=1, max_size=16), max_size=12).map(
    lambda runs: [op for run in runs for op in run]
)


# -- comparison ----------------------------------------------------------------------------------
@dataclass
class Stores:
    ours: TaskStore
    oracle: TaskStore
    seen_tokens: list[str]


async def _outcome(aw: Awaitable[T]) -> T | Exception:
    try:
        return await aw
    except Exception as e:  # compared by the caller: both stores must raise the same type
        return e


def _summary(resp: ListTasksResponse) -> tuple[list[str], int, int, str]:
    return [t.id for t in resp.tasks], resp.total_size, resp.page_size, resp.next_page_token


async def _list_both(
    stores: Stores, request: ListTasksRequest, context: ServerCallContext, label: str
) -> ListTasksResponse | None:
    """One ListTasks call on both stores; assert equal answers; the oracle's answer (or None)."""
    ours = await _outcome(stores.ours.list(request, context))
    oracle = await _outcome(stores.oracle.list(request, context))
    where = f"{label}: {request}"
    if not isinstance(ours, ListTasksResponse) or not isinstance(oracle, ListTasksResponse):
        assert type(ours) is type(oracle), f"{where}\nours: {ours!r}\noracle: {oracle!r}"
        assert isinstance(oracle, InvalidParamsError), where
        return None
    assert _summary(ours) == _summary(oracle), where
    assert list(ours.tasks) == list(oracle.tasks), where
    assert ours == oracle, where  # the whole response, any other field included
    if oracle.next_page_token:
        stores.seen_tokens.append(oracle.next_page_token)
    return oracle


async def _list_and_follow(
    stores: Stores, request: ListTasksRequest, context: ServerCallContext, label: str
) -> list[ListTasksResponse]:
    """Compare the first page, then every page reached through next_page_token.

    Returns the pages ([] if the first call raised InvalidParamsError in both stores).
    """
    pages: list[ListTasksResponse] = []
    resp = await _list_both(stores, request, context, label)
    while resp is not None:
        pages.append(resp)
        if not resp.next_page_token:
            break
        assert len(pages) < 200, f"{label}: pagination does not end"
        request = _copy(request)
        request.page_token = resp.next_page_token
        resp = await _list_both(stores, request, context, f"{label} page {len(pages) + 1}")
    return pages


def _copy(request: ListTasksRequest) -> ListTasksRequest:
    out = ListTasksRequest()
    out.CopyFrom(request)
    return out


async def _token(stores: Stores, op: List, request: ListTasksRequest) -> str:
    spec = op.token
    if spec is None:
        return ""
    if isinstance(spec, CursorToken):
        cursor = ListTasksCursor(
            timestamp_ns=spec.ts_ns, task_id=task_id(spec.task_owner, spec.name)
        )
        return encode_list_tasks_cursor(cursor)
    if isinstance(spec, LegacyToken):
        return encode_page_token(task_id(spec.task_owner, spec.name))
    if isinstance(spec, LegacyOfMatch):
        everything = _copy(request) if spec.filtered else ListTasksRequest()
        everything.page_size = 100  # more than any owner can hold here: one page
        found = await stores.oracle.list(everything, CONTEXTS_BY_OWNER[op.owner])
        ids = [t.id for t in found.tasks] or ["no such task"]
        return encode_page_token(ids[spec.k % len(ids)])
    if isinstance(spec, SeenToken):
        return stores.seen_tokens[spec.k % len(stores.seen_tokens)] if stores.seen_tokens else ""
    return spec.token


async def _apply(stores: Stores, step: int, op: Op) -> None:
    label = f"op {step} {op}"
    context = CONTEXTS_BY_OWNER[op.owner]
    if isinstance(op, Save):
        task = make_task(
            task_id(op.owner, op.name), context_id=op.context_id, state=op.state, ts_ns=op.ts_ns
        )
        task.metadata.update({"step": step})  # each upsert is distinguishable
        try:
            await stores.ours.save(task, context)
        except TerminalStateError:  # the documented difference: the oracle would accept it
            before = await stores.oracle.get(task.id, context)
            assert before is not None, label
            assert before.status.state in TERMINAL_STATES, label
            assert before.status.state != task.status.state, label
            event("save refused: terminal state")
            return
        await stores.oracle.save(task, context)
    elif isinstance(op, Delete | Get):
        tid = task_id(op.owner if op.task_owner is None else op.task_owner, op.name)
        if isinstance(op, Delete):
            await stores.ours.delete(tid, context)
            await stores.oracle.delete(tid, context)
        else:
            ours = await stores.ours.get(tid, context)
            assert ours == await stores.oracle.get(tid, context), label
    else:
        request = ListTasksRequest(context_id=op.context_id, status=op.status)
        if op.page_size:
            request.page_size = op.page_size
        if op.after is not None:
            request.status_timestamp_after.FromNanoseconds(op.after)
        request.page_token = await _token(stores, op, request)
        pages = await _list_and_follow(stores, request, context, label)
        _list_events(op, pages)


def _list_events(op: List, pages: list[ListTasksResponse]) -> None:
    """Statistics (pytest --hypothesis-show-statistics): what the list operations reached."""
    if not pages:
        answer = "InvalidParamsError"
    elif not pages[0].tasks:
        answer = "no tasks"
    else:
        answer = f"{min(len(pages), 3)}{'+' if len(pages) >= 3 else ''} page(s)"
    event(f"list with {type(op.token).__name__}: {answer}")
    ts = [t.status.timestamp.ToNanoseconds() for p in pages for t in p.tasks]
    if len(set(ts)) < len(ts):
        event("list reached tied timestamps")


async def _final_check(stores: Stores, ops: list[Op]) -> None:
    """Every owner's whole listing (3 per page) and every id the sequence named."""
    named = {task_id(op.owner, op.name) for op in ops if isinstance(op, Save)}
    for owner, context in enumerate(CONTEXTS_BY_OWNER):
        await _list_and_follow(stores, ListTasksRequest(page_size=3), context, f"final {owner}")
        ids = sorted(named)
        ours = await asyncio.gather(*(stores.ours.get(tid, context) for tid in ids))
        for tid, got in zip(ids, ours, strict=True):
            assert got == await stores.oracle.get(tid, context), f"final get {tid!r} as {owner}"


@pytest.fixture(autouse=True)
def _quiet_oracle(caplog: pytest.LogCaptureFixture) -> None:
    """The oracle warns on every delete of an absent task; keep failure reports readable."""
    caplog.set_level(logging.ERROR, logger="a2a.server.tasks.inmemory_task_store")


# -- tests ---------------------------------------------------------------------------------------
# A passing run takes a few seconds per backend; shrinking a failure can take minutes (hence
# the timeout, and no explain phase, which doubles that time for these long sequences).
@pytest.mark.timeout(600)
@settings(
    max_examples=100,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=ops_strategy)
async def test_plain_store_matches_in_memory_store(
    redis: aioredis.Redis, prefix: str, ops: list[Op]
) -> None:
    store = VersionedRedisTaskStore(redis, prefix=f"{prefix}:{next(_EXAMPLE)}")
    stores = Stores(ours=store.as_task_store, oracle=InMemoryTaskStore(), seen_tokens=[])
    for step, op in enumerate(ops):
        await _apply(stores, step, op)
    event(f"ops: {len(ops) // 10 * 10}+")
    await _final_check(stores, ops)


async def test_task_ids_are_unique_per_prefix_unlike_in_memory(
    redis: aioredis.Redis, prefix: str
) -> None:
    """The documented difference: another owner cannot take a task id that one owner holds."""
    ours = VersionedRedisTaskStore(redis, prefix=prefix).as_task_store
    oracle = InMemoryTaskStore()
    alice, bob = ctx("alice"), ctx("bob")
    a_task = make_task("shared", context_id="ca", state=TaskState.TASK_STATE_WORKING, ts_ns=1)
    b_task = make_task("shared", context_id="cb", state=TaskState.TASK_STATE_COMPLETED, ts_ns=2)
    everything = ListTasksRequest()

    for store in (ours, oracle):
        await store.save(a_task, alice)
    with pytest.raises(TaskOwnedElsewhereError):
        await ours.save(b_task, bob)
    await oracle.save(b_task, bob)  # the SDK's store keeps one task per owner

    assert await ours.get("shared", alice) == a_task  # unchanged
    assert await ours.get("shared", bob) is None
    assert list((await ours.list(everything, alice)).tasks) == [a_task]
    assert list((await ours.list(everything, bob)).tasks) == []
    await ours.delete("shared", bob)  # not bob's: a no-op
    assert await ours.get("shared", alice) == a_task

    assert await oracle.get("shared", alice) == a_task
    assert await oracle.get("shared", bob) == b_task
    assert list((await oracle.list(everything, alice)).tasks) == [a_task]
    assert list((await oracle.list(everything, bob)).tasks) == [b_task]


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param(ListTasksCursor(timestamp_ns=2**127, task_id="a"), id="ts=2**127"),
        pytest.param(ListTasksCursor(timestamp_ns=-(2**127) - 1, task_id="a"), id="ts<-2**127"),
        pytest.param(ListTasksCursor(timestamp_ns=None, task_id="\ud800"), id="lone-surrogate"),
        pytest.param(ListTasksCursor(timestamp_ns=5, task_id="\udfff"), id="ts+surrogate"),
    ],
)
async def test_crafted_cursor_gets_the_oracles_answer(
    redis: aioredis.Redis, prefix: str, cursor: ListTasksCursor
) -> None:
    """Page tokens come from clients: a cursor no real task can produce still gets a page.

    (Found by the property above: such cursors used to raise OverflowError or
    UnicodeEncodeError while encoding the index bound.)
    """
    ours = VersionedRedisTaskStore(redis, prefix=prefix).as_task_store
    oracle = InMemoryTaskStore()
    alice = ctx("alice")
    for task in (make_task("a", ts_ns=5), make_task("b"), make_task("c", ts_ns=-5)):
        await ours.save(task, alice)
        await oracle.save(task, alice)
    request = ListTasksRequest(page_token=encode_list_tasks_cursor(cursor), page_size=1)
    assert await ours.list(request, alice) == await oracle.list(request, alice)
