"""The observability example: /metrics on the replicas, Prometheus and Grafana in compose.

No Docker engine is needed: the compose file, Prometheus's config and Grafana's
provisioning are parsed and checked against each other, and the dashboard's queries are
checked against the Prometheus names our instruments really export (read from the
OpenTelemetry Prometheus exporter after recording once on every instrument). Two real
replicas of ``examples/agent_server.py --metrics`` serve a task and then their metrics.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import REGISTRY, generate_latest

from a2a_redis import telemetry
from a2a_redis.telemetry import state
from tests.helpers import ROOT, client_pair, final_state, replica_pair, start_stream

EXAMPLES = ROOT / "examples"
GRAFANA = EXAMPLES / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "a2a-redis.json"
REPLICAS = ("replica-1", "replica-2")


def load_yaml(path: str) -> dict[str, Any]:
    data = yaml.safe_load((EXAMPLES / path).read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    found: dict[str, Any] = load_yaml("docker-compose.yml")["services"]
    return found


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """``{target in the container: source on the host}`` of a service's bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        found[target] = source
    return found


def test_prometheus_scrapes_both_replicas_on_their_port(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    config_path = mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    assert (EXAMPLES / config_path).is_file()
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = load_yaml(config_path)
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    ports = {str(p) for name in REPLICAS for p in services[name]["expose"]}
    assert sorted(targets) == sorted(f"{name}:{port}" for name in REPLICAS for port in ports)
    assert set(prometheus["depends_on"]) == set(REPLICAS)


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard(
    services: dict[str, Any],
) -> None:
    grafana = services["grafana"]
    mounted = mounts(grafana)
    provisioning = EXAMPLES / mounted["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    prometheus_port = services["prometheus"]["ports"][0].split(":")[-1]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "a2a-redis.yml").read_text())[
        "providers"
    ]
    dashboards = provider["options"]["path"]
    assert (EXAMPLES / mounted[dashboards] / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards}/{DASHBOARD.name}"
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]


def exported_names() -> set[str]:
    """The Prometheus series names our instruments export, each recorded once."""
    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    telemetry.configure(meter_provider=provider)
    try:
        for instrument in state._S.i.values():
            if hasattr(instrument, "record"):
                instrument.record(0.01, {"operation": "save", "outcome": "ok", "path": "live"})
            elif hasattr(instrument, "add"):
                instrument.add(1, {"reason": "too_large"})
        owner = type("Owner", (), {})()
        for name, *_ in state._OBSERVED:
            telemetry.observe(name, owner, lambda _: 1)
        text = generate_latest(REGISTRY).decode()
    finally:
        telemetry.configure()
        provider.shutdown()  # (unregisters the reader's collector)
    return set(re.findall(r"^(a2a_redis_\w+?)(?:\{| )", text, re.MULTILINE))


def dashboard_queries() -> dict[str, list[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"]}


def test_the_dashboard_queries_only_what_we_emit() -> None:
    emitted = exported_names()
    assert "a2a_redis_store_duration_seconds_bucket" in emitted  # the reading works
    used = {
        name
        for exprs in dashboard_queries().values()
        for expr in exprs
        for name in re.findall(r"\ba2a_redis_\w+", expr)
    }
    assert used
    assert used - emitted == set()


def test_the_dashboard_shows_what_operators_ask() -> None:
    queries = " ".join(e for exprs in dashboard_queries().values() for e in exprs)
    for wanted in (
        r'histogram_quantile\(0\.5, [^\n]*store_duration_seconds_bucket\{operation="save"\}',
        r'histogram_quantile\(0\.99, [^\n]*store_duration_seconds_bucket\{operation="save"\}',
        r'rate\(a2a_redis_store_duration_seconds_count\{operation="save",outcome="conflict"\}',
        r"histogram_quantile\(0\.5, [^\n]*delivery_latency_seconds_bucket",
        r"histogram_quantile\(0\.99, [^\n]*delivery_latency_seconds_bucket",
        r"a2a_redis_stream_subscribers",
        r"a2a_redis_listener_reconnects_total",
        r"a2a_redis_leases_held",
        r"a2a_redis_orphans_failed_total",
        r"rate\(a2a_redis_push_delivered_total",
        r"rate\(a2a_redis_push_dead_total",
        r"a2a_redis_push_in_flight",
    ):
        assert re.search(wanted, queries), wanted


@pytest.fixture
def metrics_pair(real_url: str, prefix: str) -> Iterator[Any]:
    with replica_pair(real_url, prefix, 0.01, "--metrics") as pair:
        yield pair


async def test_replicas_serve_their_metrics(metrics_pair: Any) -> None:
    a, b = metrics_pair
    async with client_pair(a, b) as (client_a, _):
        _task_id, seen, runner = await start_stream(client_a, "chunks=2")
        await asyncio.wait_for(runner, 30)  # a hang guard only
    assert final_state(seen) > 0
    async with httpx.AsyncClient() as http:
        page = (await http.get(a.url + "/metrics", timeout=10)).text
    assert re.search(r'a2a_redis_store_duration_seconds_count\{[^}]*operation="save"', page)
    assert re.search(r"^a2a_redis_leases_held\{", page, re.MULTILINE)
