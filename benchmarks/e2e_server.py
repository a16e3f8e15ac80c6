"""The e2e benchmark's anchor replicas: ``examples/agent_server.py``'s agent on the SDK's own
backends (the Redis replicas run ``examples/agent_server.py`` itself).

    python -m benchmarks.e2e_server --port 9001 --backend memory
    python -m benchmarks.e2e_server --port 9001 --backend sql --db-url URL

``memory``: the SDK's ``DefaultRequestHandler`` with ``InMemoryTaskStore`` (one process, no
cluster). ``sql``: its cluster mode, ``VersionedDatabaseTaskStore`` and
``DatabaseTaskEventStream`` (0.5 s poll) on the SQLAlchemy URL, in their default tables (the
benchmark gives them a database of their own).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import uvicorn
from a2a.server.cluster import DatabaseTaskEventStream, VersionedDatabaseTaskStore
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore
from a2a.types import AgentCapabilities, AgentCard, AgentInterface
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "agent_server.py"


def example() -> ModuleType:
    """``examples/agent_server.py`` as a module (for its ``ChunkAgent``)."""
    spec = importlib.util.spec_from_file_location("a2a_redis_example_agent_server", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_app(args: argparse.Namespace) -> Starlette:
    url = f"http://{args.host}:{args.port}/"
    card = AgentCard(
        name="a2a-redis e2e anchor",
        description="examples/agent_server.py's agent on the SDK's own backends.",
        version="1.0.0",
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text"],
        default_output_modes=["text"],
        supported_interfaces=[
            AgentInterface(protocol_binding="JSONRPC", protocol_version="1.0", url=url)
        ],
    )
    agent = example().ChunkAgent(args.name, args.delay)
    engine = None
    kwargs: dict[str, Any] = {}
    if args.backend == "memory":
        store: Any = InMemoryTaskStore()
    else:
        engine = create_async_engine(args.db_url)
        store = VersionedDatabaseTaskStore(engine)
        kwargs["event_stream"] = DatabaseTaskEventStream(engine)
    handler = DefaultRequestHandler(agent, store, card, **kwargs)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if engine is not None:
            await store.initialize()
            await kwargs["event_stream"].initialize()
        yield
        if engine is not None:
            await engine.dispose()

    routes = create_agent_card_routes(card) + create_jsonrpc_routes(handler, "/")
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", choices=("memory", "sql"), required=True)
    parser.add_argument("--db-url", default="")
    parser.add_argument("--name", default="anchor")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(build_app(args), host=args.host, port=args.port, log_level="error")


if __name__ == "__main__":
    main()
