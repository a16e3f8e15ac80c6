"""Hang guard: a test that hangs names the asyncio tasks it waits on.

pytest-timeout dumps only thread stacks, so an asyncio hang shows as the event loop idle in
``selectors.poll`` and names nothing. At 85% of the test's timeout this guard reads every
task of every running event loop, with the lines it waits on, cancels them (a task that
swallowed one cancel, say in ``asyncio.Runner.close``, gets another), and fails the test
with that list. The list is printed again at the end of the run, just before pytest's short
summary, so it is in the last lines of a CI log.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
from collections.abc import Generator
from typing import Any

import pytest

_DUMP = pytest.StashKey[str]()
_HUNG: list[str] = []
SHARE = 0.85  # of the test's pytest-timeout


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    return float(item.config.getini("timeout") or 0)


def _running_loops() -> list[asyncio.AbstractEventLoop]:
    return [
        o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop) and o.is_running()
    ]


def _describe(task: asyncio.Task[Any]) -> str:
    frames = task.get_stack(limit=None)
    where = " <- ".join(
        f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno} {f.f_code.co_name}"
        for f in reversed(frames[-4:])
    )
    return f"  {task.get_name()}: {where or 'not started'}"


def _dump_and_cancel(item: pytest.Item) -> None:
    lines = [f"hang guard: {item.nodeid} still running; its asyncio tasks, innermost first:"]
    for loop in _running_loops():
        for _ in range(5):  # all_tasks() from another thread can meet a set being changed
            try:
                tasks = list(asyncio.all_tasks(loop))
                break
            except RuntimeError:
                continue
        else:
            tasks = []
        lines += [_describe(t) for t in tasks]
        for task in tasks:
            loop.call_soon_threadsafe(task.cancel)
    text = "\n".join(lines)
    item.stash[_DUMP] = text
    _HUNG.append(text)
    print(text, file=sys.__stderr__, flush=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    timeout = _timeout_of(item)
    timer = None
    if timeout > 0:
        timer = threading.Timer(timeout * SHARE, _dump_and_cancel, args=(item,))
        timer.daemon = True
        timer.start()
    try:
        return (yield)
    finally:
        if timer is not None:
            timer.cancel()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    dump = item.stash.get(_DUMP, None)
    if dump is not None and call.when == "teardown":
        report.sections.append(("hang guard", dump))
        if report.passed:  # it finished only because the guard cancelled what it waited on
            report.outcome = "failed"
            report.longrepr = dump
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for text in _HUNG:
        terminalreporter.write_line(text)
