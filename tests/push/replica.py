"""A replica with push delivery on: ``examples/agent_server.py``'s agent, a card declaring
push notifications, and the sender's options from the command line (small ones for tests).

    python tests/push/replica.py --port P --redis-url URL --prefix X --name A \
        --claim-after 1 --max-age 120 --max-attempts 10 --consumer-file F

``--consumer-file``: where the replica writes its sender's consumer name (the test finds the
replica holding a job by it, in the job stream's pending list).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import uvicorn
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from starlette.applications import Starlette

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from agent_server import ChunkAgent  # noqa: E402

from a2a_redis import RedisBackend  # noqa: E402
from a2a_redis.push import RetryPolicy  # noqa: E402
from tests.helpers import push_card  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, kind, default in (
        ("port", int, 0), ("redis-url", str, ""), ("prefix", str, "a2a"), ("name", str, "A"),
        ("delay", float, 0.05), ("claim-after", float, 1.0), ("max-age", float, 120.0),
        ("max-attempts", int, 10), ("consumer-file", str, ""),
    ):  # fmt: skip
        parser.add_argument(f"--{name}", type=kind, default=default)
    args = parser.parse_args()
    card = push_card()  # the tests' card, declaring push notifications, served here
    card.supported_interfaces[0].url = f"http://127.0.0.1:{args.port}/"
    retry = RetryPolicy(
        max_attempts=args.max_attempts, max_age=args.max_age, base_delay=0.01, max_delay=0.05
    )
    push = {"allow_hosts": ["127.0.0.1"], "claim_after": args.claim_after, "retry": retry}
    backend = RedisBackend.from_url(args.redis_url, prefix=args.prefix, push_options=push)
    handler = backend.request_handler(ChunkAgent(args.name, args.delay), card)
    assert backend.push_sender is not None
    if args.consumer_file:
        Path(args.consumer_file).write_text(backend.push_sender.consumer)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        await backend.push_sender.start()  # type: ignore[union-attr]
        yield
        await backend.aclose()

    routes = create_agent_card_routes(card) + create_jsonrpc_routes(handler, "/")
    app = Starlette(routes=routes, lifespan=lifespan)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
