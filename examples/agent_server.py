"""A small A2A agent server that runs as one of several replicas sharing one Redis.

    python examples/agent_server.py --port 9001 --redis-url redis://127.0.0.1:6379 --name A

With ``--metrics`` (the ``metrics`` extra), the replica also serves ``/metrics``: a2a-redis's
OpenTelemetry instruments through the OpenTelemetry Prometheus exporter.
The agent streams a few text chunks, slowly enough to watch from another replica. A
message containing "input" asks for input first; one containing "fail" raises.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import re

import uvicorn
from a2a.helpers.proto_helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events.event_queue import EventQueue
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks.task_updater import TaskUpdater
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill, Part
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from a2a_redis import RedisBackend


class ChunkAgent(AgentExecutor):
    """WORKING, then ``chunks=N`` (default 5) text chunks ``delay`` seconds apart, then done.

    ``silent=S``: first S seconds without a word (an agent waiting on a model or a tool).
    ``fail``: raise at once; ``fail-late``: raise after the chunks.
    """

    def __init__(self, replica: str, delay: float) -> None:
        self.replica = replica
        self.delay = delay

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        text = context.get_user_input()
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        if context.current_task is None:
            await event_queue.enqueue_event(new_task_from_user_message(context.message))
        await updater.start_work(updater.new_agent_message([Part(text=f"{self.replica}: on it")]))
        if "fail" in text and "fail-late" not in text:
            raise RuntimeError("the agent was asked to fail")
        if "input" in text and "answer" not in text:
            await updater.requires_input(updater.new_agent_message([Part(text="your answer?")]))
            return
        silent = re.search(r"silent=([\d.]+)", text)
        if silent:
            await asyncio.sleep(float(silent.group(1)))
        found = re.search(r"chunks=(\d+)", text)
        for i in range(int(found.group(1)) if found else 5):
            await asyncio.sleep(self.delay)
            await updater.add_artifact(
                [Part(text=f"chunk {i} from {self.replica}")], artifact_id="answer",
                name="answer", append=i > 0,
            )  # fmt: skip
        if "fail-late" in text:
            raise RuntimeError("the agent was asked to fail after its chunks")
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Report CANCELED, naming this replica (the handler then stops ``execute``)."""
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        await updater.cancel(updater.new_agent_message([Part(text=f"{self.replica}: cancelled")]))


def metrics_route(name: str) -> Route:
    """Install an OpenTelemetry SDK meter exporting to Prometheus; the ``/metrics`` route.

    a2a-redis records through the OpenTelemetry API only: setting the global provider (as
    any application would) is all it takes.
    """
    from opentelemetry import metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    resource = Resource.create({"service.name": "a2a-redis-agent", "service.instance.id": name})
    metrics.set_meter_provider(
        MeterProvider(resource=resource, metric_readers=[PrometheusMetricReader()])
    )

    async def serve(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", serve)


def agent_card(
    url: str,
    name: str = "a2a-redis example agent",
    description: str = "Streams text chunks; any replica can serve any task.",
) -> AgentCard:
    """The agent card: streaming, over JSON-RPC at ``url``, with the one chunks skill."""
    return AgentCard(
        name=name,
        description=description,
        version="1.0.0",
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text"],
        default_output_modes=["text"],
        supported_interfaces=[
            AgentInterface(protocol_binding="JSONRPC", protocol_version="1.0", url=url)
        ],
        skills=[
            AgentSkill(
                id="chunks", name="Chunks", description="Streams text chunks.", tags=["demo"]
            )
        ],
    )


def build_app(
    url: str,
    redis_url: str,
    prefix: str,
    name: str,
    delay: float,
    legacy: bool = False,
    lease_ttl: float = 10.0,
    orphan_policy: str = "fail",
    metrics: bool = False,
) -> Starlette:
    """The replica's Starlette app: the SDK's JSON-RPC routes over a2a-redis.

    One line wires the handler: the V2 ``DefaultRequestHandler`` in cluster mode, or with
    ``legacy`` the ``LegacyRequestHandler`` with ``RedisTaskStore`` and ``RedisQueueManager``.
    """
    card = agent_card(url)
    backend = RedisBackend.from_url(
        redis_url, prefix=prefix, lease_ttl=lease_ttl, orphan_policy=orphan_policy
    )
    handler = backend.request_handler(ChunkAgent(name, delay), card, legacy=legacy)  # the line

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        gc.freeze()  # optional GC tuning (README, Performance): start-up is never walked again
        yield
        await backend.aclose()

    routes = create_agent_card_routes(card) + create_jsonrpc_routes(handler, "/")
    if metrics:
        routes.insert(0, metrics_route(name))
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="a2a")
    parser.add_argument("--name", default="replica")
    parser.add_argument("--delay", type=float, default=0.3, help="seconds between chunks")
    parser.add_argument("--legacy", action="store_true", help="LegacyRequestHandler + queues")
    parser.add_argument("--lease-ttl", type=float, default=10.0, help="task lease seconds")
    parser.add_argument(
        "--orphan-policy", default="fail", choices=("fail", "keep"),
        help="what a survivor does with a dead replica's running tasks",
    )  # fmt: skip
    parser.add_argument(
        "--metrics", action="store_true", help="serve /metrics (Prometheus, via OpenTelemetry)"
    )
    parser.add_argument("--log-level", default="warning", help="python logging level")
    parser.add_argument(
        "--public-url", default="", help="URL the agent card advertises (e.g. the load balancer)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper())
    url = args.public_url or f"http://{args.host}:{args.port}/"
    app = build_app(
        url, args.redis_url, args.prefix, args.name, args.delay, args.legacy, args.lease_ttl,
        args.orphan_policy, args.metrics,
    )  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())


if __name__ == "__main__":
    main()
