"""The doctor's topology sections: a cluster's nodes and slots, or what the Sentinels say.

For a Sentinel-managed client: its Sentinels' view of the master and the replicas.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import NoBackoff

from a2a_redis.connection.cluster import node_client
from a2a_redis.connection.compat import reply_pairs
from a2a_redis.ops.report import Report

__all__ = ["cluster_topology", "sentinel_topology"]


# -- Redis Cluster -----------------------------------------------------------------------
async def cluster_topology(seed: ClusterNode, report: Report) -> list[tuple[str, str]]:
    """Print the primaries, their replicas and slot coverage; every node's (address, role)."""
    first = node_client(seed)
    try:
        info = (await first.execute_command("CLUSTER", "INFO")).decode()  # type: ignore[no-untyped-call]
        state = dict(line.split(":", 1) for line in info.split() if ":" in line)
        raw_nodes = (await first.execute_command("CLUSTER", "NODES")).decode()  # type: ignore[no-untyped-call]
    finally:
        await first.aclose()
    primaries: list[tuple[str, str, str, int]] = []
    replicas_of: dict[str, list[tuple[str, str]]] = {}
    for line in raw_nodes.splitlines():
        node_id, address, flags, master, *_rest = line.split()
        slots = [s for s in line.split()[8:] if not s.startswith("[")]
        if "master" in flags:
            primaries.append((node_id, address.split("@")[0], flags, _slot_count(slots)))
        elif master != "-":
            replicas_of.setdefault(master, []).append((address.split("@")[0], flags))
    covered = sum(n for *_, n in primaries)
    report.line(
        "topology",
        f"Redis Cluster: {len(primaries)} primaries, "
        f"{sum(len(r) for r in replicas_of.values())} replicas, state {state.get('cluster_state')}",
    )
    report.line("slots", f"{covered} of 16384 covered")
    if state.get("cluster_state") != "ok":
        report.problem(f"cluster_state is {state.get('cluster_state')!r}: commands fail")
    if covered < 16384:
        report.problem(f"{16384 - covered} slots are not covered: tasks hashing there fail")
    for node_id, address, flags, count in sorted(primaries, key=lambda p: p[1]):
        replicas = replicas_of.get(node_id, [])
        shown = ", ".join(a for a, _ in replicas) or "no replica"
        print(f"  primary {address:<21} {count:>5} slots  replicas: {shown}")
        if "fail" in flags:
            report.problem(f"primary {address} is marked failed")
        if not replicas:
            print(f"             note: {address} has no replica: if it fails, its slots stop")
    members = [(a, "primary") for _, a, _, _ in sorted(primaries, key=lambda p: p[1])]
    members += sorted((a, "replica") for r in replicas_of.values() for a, _ in r)
    return members


def _slot_count(ranges: list[str]) -> int:
    total = 0
    for part in ranges:
        low, _, high = part.partition("-")
        total += int(high or low) - int(low) + 1
    return total


# -- Sentinel ----------------------------------------------------------------------------
# -- doctor --------------------------------------------------------------------------------
def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _fields(reply: Any) -> dict[str, str]:
    """A Sentinel reply (flat RESP2 pairs or a RESP3 map) as a dict of strings."""
    return {_text(k): _text(v) for k, v in reply_pairs(reply)}


@dataclass
class _SentinelView:
    address: str
    master: dict[str, str]
    replicas: list[dict[str, str]]
    peers: int


def _address(client: Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


async def _ask(sentinel: Redis, service: str, report: Report) -> _SentinelView | None:
    """What one Sentinel says about ``service``; None (after a warning) if it cannot say."""
    address = _address(sentinel)
    ask: Any = sentinel.execute_command
    try:
        master = _fields(await ask("SENTINEL", "MASTER", service))
        replicas = [_fields(r) for r in await ask("SENTINEL", "REPLICAS", service)]
        peers = len(await ask("SENTINEL", "SENTINELS", service))
    except (rex.ConnectionError, rex.TimeoutError) as e:
        report.problem(f"Sentinel {address} is unreachable: {e}")
        return None
    except rex.ResponseError as e:
        report.problem(f"Sentinel {address} does not monitor {service!r}: {e}")
        return None
    return _SentinelView(address, master, replicas, peers)


def _node_kwargs(pool: SentinelConnectionPool) -> dict[str, Any]:
    """Connection options of the pool's data nodes (auth, TLS, timeouts) for one node."""
    kwargs = {
        k: v
        for k, v in pool.connection_kwargs.items()
        if k in ("username", "password", "credential_provider", "protocol")
        or k.startswith(("ssl_", "socket_"))
    }
    if issubclass(pool.connection_class, SSLConnection):
        kwargs["ssl"] = True
    kwargs["socket_timeout"] = kwargs["socket_connect_timeout"] = 5.0
    return kwargs


async def _persistence(state: dict[str, str], kwargs: dict[str, Any]) -> tuple[str, bool | None]:
    """("AOF on; RDB ...", has persistence) of a data node; None when it cannot tell."""
    client = Redis(
        host=state.get("ip", ""),
        port=int(state.get("port", "0") or 0),
        retry=Retry(NoBackoff(), 0),
        **kwargs,
    )
    try:
        aof, save = [_fields(await client.config_get(name)).get(name, "") for name in _PERSISTENCE]
    except (rex.ConnectionError, rex.TimeoutError, rex.ResponseError) as e:
        return f"persistence unknown ({e})", None
    finally:
        with contextlib.suppress(rex.ConnectionError, OSError):
            await client.aclose()
    has = aof == "yes" or bool(save.strip())
    return f"AOF {'on' if aof == 'yes' else 'off'}, RDB {repr(save) if save else 'off'}", has


_PERSISTENCE = ("appendonly", "save")


def _flags(state: dict[str, str]) -> set[str]:
    return set(state.get("flags", "").split(","))


async def sentinel_topology(client: Redis, report: Report) -> None:
    """The doctor's lines for a Sentinel-managed client: what its Sentinels say.

    Lines: the Sentinels (in the client, answering, monitoring the service, quorum), the
    master and its flags, each replica with its link status and persistence. Problems: a
    Sentinel that does not answer, Sentinels that disagree on the master, fewer than 3
    Sentinels, a quorum larger than the Sentinels, a master seen down, no replica, a
    replica not replicating, a replica or master without persistence.
    """
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    service: str = pool.service_name
    sentinels: list[Redis] = pool.sentinel_manager.sentinels
    views = [v for s in sentinels if (v := await _ask(s, service, report)) is not None]
    if not views:
        raise rex.ConnectionError(f"no Sentinel answered for the service {service!r}")
    view = views[0]
    master = view.master
    address = f"{master.get('ip', '?')}:{master.get('port', '?')}"
    known, quorum = view.peers + 1, int(master.get("quorum", "0") or 0)
    report.line(
        "sentinels",
        f"{len(sentinels)} in the URL, {len(views)} answered; {known} monitor {service!r} "
        f"(per {view.address}); quorum {quorum}",
    )
    seen = {f"{v.master.get('ip')}:{v.master.get('port')}" for v in views}
    if len(seen) > 1:
        report.problem(f"the Sentinels disagree on the master: {', '.join(sorted(seen))}")
    if known < 3:
        report.problem(
            f"only {known} Sentinel(s) monitor {service!r}: a failover needs a majority of "
            "them, so run at least 3, on separate machines"
        )
    if quorum > known:
        report.problem(f"quorum {quorum} exceeds the {known} Sentinels: no failover can happen")
    flags = _flags(master)
    report.line("master", f"{service} at {address}, flags {','.join(sorted(flags))}")
    if flags & {"s_down", "o_down", "disconnected"}:
        report.problem(f"the Sentinels see the master {address} as down")
    kwargs = _node_kwargs(pool)
    if not view.replicas:
        report.problem("no replica: a failover has nothing to promote, and WAIT cannot succeed")
    for replica in view.replicas:
        where = f"{replica.get('ip', '?')}:{replica.get('port', '?')}"
        link = replica.get("master-link-status", "?")
        persistence, has = await _persistence(replica, kwargs)
        offset = replica.get("slave-repl-offset", "?")
        report.line("replica", f"{where}, link {link}, offset {offset}; {persistence}")
        if link != "ok" or _flags(replica) & {"s_down", "o_down", "disconnected"}:
            report.problem(f"replica {where} is not replicating (link {link})")
        if has is False:
            report.problem(
                f"replica {where} has no persistence (appendonly no, no save points): "
                "once promoted, a restart of it loses every task"
            )
    _, has = await _persistence(master, kwargs)
    if has is False:
        report.problem(
            f"the master {address} has no persistence: if it restarts before a failover it "
            "comes back empty, and its replicas copy the empty data set"
        )
