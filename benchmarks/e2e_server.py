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
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from a2a.server.cluster import DatabaseTaskEventStream, VersionedDatabaseTaskStore
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette

from benchmarks.common import load_example


def build_app(args: argparse.Namespace) -> Starlette:
    url = f"http://{args.host}:{args.port}/"
    example = load_example("agent_server")
    card = example.agent_card(
        url, "a2a-redis e2e anchor", "examples/agent_server.py's agent on the SDK's own backends."
    )
    agent = example.ChunkAgent(args.name, args.delay)
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
