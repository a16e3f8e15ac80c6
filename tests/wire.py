"""Every Redis command this process writes, read off the wire.

redis-py's connections and the store's packed fast path (``connection/transaction.py``)
both write through ``asyncio.StreamWriter.writelines``: tapping it sees every command,
pipelines, transactions and scripted batches included. Writes that are not RESP arrays
(another protocol on another stream) are passed on unread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest


def resp_commands(data: bytes) -> Iterator[list[bytes]]:
    """The RESP arrays of bulk strings in ``data``, each as its list of arguments."""
    at = 0
    while at < len(data):
        end = data.index(b"\r\n", at)
        count, at = int(data[at + 1 : end]), end + 2
        args = []
        for _ in range(count):
            end = data.index(b"\r\n", at)
            size = int(data[at + 1 : end])
            args.append(data[end + 2 : end + 2 + size])
            at = end + 2 + size + 2
        yield args


def tap_wire(monkeypatch: pytest.MonkeyPatch, seen: Callable[[list[bytes]], None]) -> None:
    """Call ``seen(arguments)`` for each command any connection writes from now on."""
    real = asyncio.StreamWriter.writelines

    def writelines(self: asyncio.StreamWriter, data: Iterable[Any]) -> None:
        chunks = list(data)
        raw = b"".join(bytes(chunk) for chunk in chunks)
        if raw.startswith(b"*"):
            for command in resp_commands(raw):
                seen(command)
        real(self, chunks)

    monkeypatch.setattr(asyncio.StreamWriter, "writelines", writelines)
