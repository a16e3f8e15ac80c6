"""``a2a-redis doctor``: how a server looks to a2a-redis, and what is wrong with it.

Server name and version, mode and role, round trip, memory and ``maxmemory-policy`` (a
loud warning unless ``noeviction``: eviction silently deletes tasks), persistence, our keys
under a prefix (count, memory, by kind), and the replicas running tasks (a warning for one
whose heartbeat is a minute late while its tasks are not ended: no replica sweeps). On a
Redis Cluster: the topology, slot coverage (a warning for uncovered slots or a failed
state), primaries without replicas, replicas without persistence, then each node's own
report. Used by :mod:`a2a_redis.ops.cli`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, cast

import redis
from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from a2a_redis.connection.cluster import Client, is_cluster, node_client
from a2a_redis.log.keys import Keys
from a2a_redis.ops.push_cli import push_report
from a2a_redis.ops.report import Report, size
from a2a_redis.ops.topology import cluster_topology, sentinel_topology
from a2a_redis.version import __version__

__all__ = ["KEY_SCAN_CAP", "KINDS", "Report", "check", "key_kind", "size"]

KEY_SCAN_CAP = 10_000
MIN_SERVER_VERSION = (6, 2)
_PINGS = 5
_KINDS = ("task", "events", "lease", "push", "index", "replica")
#: The kinds of our keys (``stats`` shares them).
KINDS = _KINDS


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


async def _config(client: Redis, name: str) -> str | None:
    """``CONFIG GET name``, or None when CONFIG is renamed, disabled or not permitted."""
    try:
        reply: dict[Any, Any] = await client.config_get(name)
    except rex.ResponseError:
        return None
    value = reply.get(name, reply.get(name.encode()))
    return value.decode() if isinstance(value, bytes) else value


async def _server(client: Redis, report: Report, *, replica_ok: bool = False) -> bool:
    """Server, mode, role and latency lines; False if this is no data server (Sentinel)."""
    server: dict[str, Any] = await client.info("server")
    if "valkey_version" in server:
        name = f"Valkey {server['valkey_version']} (Redis-compatible {server['redis_version']})"
    else:
        name = f"Redis {server.get('redis_version', '?')}"
    mode = str(server.get("redis_mode") or server.get("server_mode") or "standalone")
    if mode == "sentinel":
        report.line("server", f"{name}, sentinel")
        report.problem(
            "this is a Sentinel, not a data server: use redis+sentinel://HOST:PORT/SERVICE"
        )
        return False
    cluster: dict[str, Any] = await client.info("cluster")
    if cluster.get("cluster_enabled"):
        mode = "cluster node"
    role = (await client.info("replication")).get("role", "?")
    report.line("server", name)
    report.line("library", f"a2a-redis {__version__}, redis-py {redis.__version__}")
    report.line("mode", f"{mode}, role {'replica' if role == 'slave' else role}")
    if role == "slave" and not replica_ok:
        report.problem("this server is a read-only replica: every write will fail")
    if _version_tuple(str(server.get("redis_version", "0"))) < MIN_SERVER_VERSION:
        report.problem("a2a-redis needs Redis 6.2 or later (ZRANGE BYLEX REV, XAUTOCLAIM)")
    times = []
    for _ in range(_PINGS):
        start = time.perf_counter()
        await client.ping()
        times.append(time.perf_counter() - start)
    report.line(
        "round trip", f"{statistics.median(times) * 1000:.3f} ms (median of {_PINGS} PINGs)"
    )
    return True


async def _memory(client: Redis, report: Report) -> None:
    memory: dict[str, Any] = await client.info("memory")
    policy = str(memory.get("maxmemory_policy") or await _config(client, "maxmemory-policy"))
    used, limit = int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
    limit_text = "no limit" if limit == 0 else size(limit)
    report.line("memory", f"{size(used)} used, maxmemory {limit_text}")
    report.line("eviction", f"maxmemory-policy {policy}")
    if policy != "noeviction":
        report.problem(
            f"maxmemory-policy is {policy!r}, not 'noeviction': when memory runs short Redis "
            "SILENTLY DELETES KEYS, and so tasks and their events. Set maxmemory-policy "
            "noeviction (writes then fail loudly instead)."
        )
    if limit and used >= 0.9 * limit:
        report.problem(f"memory use is {used * 100 // limit}% of maxmemory")


async def _persistence(client: Redis, report: Report) -> None:
    info: dict[str, Any] = await client.info("persistence")
    aof = "on" if info.get("aof_enabled") else "off"
    fsync = await _config(client, "appendfsync") if aof == "on" else None
    save = await _config(client, "save")
    if save is None:
        rdb = "unknown (CONFIG GET refused)"
    else:
        rdb = f"save {save!r}" if save else "off (no save points)"
    report.line("persistence", f"AOF {aof}{f' (appendfsync {fsync})' if fsync else ''}; RDB {rdb}")
    if aof == "off" and save == "":
        print("             note: no persistence: a restart of this server loses every task")
    for status in ("rdb_last_bgsave_status", "aof_last_write_status"):
        if info.get(status, "ok") != "ok":
            report.problem(f"{status} is {info[status]!r}: persistence is failing")


def _kind(prefix: str, key: bytes | str) -> str:
    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    rest = text[len(prefix) + 1 :]
    if rest.startswith("{o:"):
        return "index"
    if rest.startswith("{r:") or rest == "replicas":
        return "replica"
    if rest.startswith("{t:"):
        end = rest.find("}:")
        suffix = rest[end + 2 :] if end >= 0 else ""
        return suffix if suffix in _KINDS else "other"
    return "other"


key_kind = _kind  # ``stats`` counts keys as doctor does


async def _our_keys(client: Redis, keys: Keys, report: Report) -> None:
    counts = dict.fromkeys(_KINDS, 0)
    sizes = dict.fromkeys(_KINDS, 0)
    memory_known, capped, total, cursor = True, False, 0, 0
    while True:
        cursor, batch = await client.scan(cursor, match=keys.scan_pattern(), count=1000)
        capped = len(batch) > KEY_SCAN_CAP - total
        batch = batch[: KEY_SCAN_CAP - total]
        total += len(batch)
        async with client.pipeline(transaction=False) as pipe:
            for key in batch:
                pipe.memory_usage(key)
            usages = await pipe.execute(raise_on_error=False) if batch else []
        for key, usage in zip(batch, usages, strict=True):
            kind = _kind(keys.prefix, key)
            counts[kind] = counts.get(kind, 0) + 1
            if isinstance(usage, int):
                sizes[kind] = sizes.get(kind, 0) + usage
            elif isinstance(usage, Exception):
                memory_known = False
        if cursor == 0 or total >= KEY_SCAN_CAP:
            break
    capped = capped or (cursor != 0 and total >= KEY_SCAN_CAP)
    memory = size(sum(sizes.values())) if memory_known else "unknown (MEMORY USAGE refused)"
    count = (
        f"the first {total:,} (counting stops there; more may exist)" if capped else f"{total:,}"
    )
    report.line("our keys", f"{count} under {keys.prefix + ':'!r}, {memory}")
    for kind, n in counts.items():
        if n or kind in _KINDS:
            shown = f"{size(sizes.get(kind, 0)):>12}" if memory_known else ""
            print(f"  {kind:<11}{n:>8,} {shown}")


async def replicas(client: Client, keys: Keys, report: Report) -> None:
    """The replicas running tasks: live ones, and dead ones whose tasks are not ended yet."""
    rows = cast(
        list[tuple[bytes, float]], await client.zrange(keys.replicas, 0, -1, withscores=True)
    )
    seconds, micros = await client.time()
    now = seconds * 1000 + micros // 1000
    live = [r.decode() for r, deadline in rows if deadline > now]
    names = f": {', '.join(live)}" if live else ""
    report.line("replicas", f"{len(live)} running tasks now{names}")
    for raw, deadline in rows:
        replica = raw.decode()
        tasks = int(await client.scard(keys.replica_tasks(replica)))
        late = (now - deadline) / 1000
        beat = f"heartbeat due in {-late:.1f}s" if late < 0 else f"heartbeat missed {late:.1f}s ago"
        print(f"  {replica}  {tasks:>6,} tasks  {beat}")
        if late > 60:
            report.problem(
                f"replica {replica} missed its heartbeat {late:.0f}s ago and {tasks} of its "
                "tasks are not ended: no live replica sweeps (start one with "
                "orphan_policy='fail', or end them by hand)"
            )


async def check(client: Client, keys: Keys, report: Report) -> None:
    """Print every section of the report for ``client``, noting problems in ``report``."""
    if is_cluster(client):
        await _cluster(client, keys, report)
        await replicas(client, keys, report)
        await push_report(client, keys, report)
        return
    if isinstance(client.connection_pool, SentinelConnectionPool):  # Sentinel-managed
        await sentinel_topology(client, report)
    if await _server(client, report):
        await _memory(client, report)
        await _persistence(client, report)
        await _our_keys(client, keys, report)
        await replicas(client, keys, report)
        await push_report(client, keys, report)


# -- Redis Cluster -------------------------------------------------------------------------
async def _cluster(cluster: RedisCluster, keys: Keys, report: Report) -> None:
    """Topology and slot coverage, then every primary's and replica's own report."""
    await cluster.initialize()
    seed = cluster.get_nodes()[0]
    members = await cluster_topology(seed, report)
    for address, role in members:
        client = node_client(seed, address)
        try:
            print(f"-- {role} {address}")
            await _server(client, report, replica_ok=role == "replica")
            await _memory(client, report)
            await _persistence(client, report)
            if role == "replica" and not await _persists(client):
                report.problem(f"replica {address} has no persistence (AOF off, no RDB)")
            if role == "primary":
                await _our_keys(client, keys, report)
        except (rex.ConnectionError, rex.TimeoutError) as e:
            report.problem(f"{role} {address} does not answer: {e}")
        finally:
            await client.aclose()


async def _persists(client: Redis) -> bool:
    info: dict[str, Any] = await client.info("persistence")
    return bool(info.get("aof_enabled")) or bool(await _config(client, "save"))
