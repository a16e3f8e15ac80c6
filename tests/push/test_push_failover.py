"""Push delivery through a Sentinel failover (``tests/deployments.py``: a primary, a replica,
three Sentinels). ``SENTINEL FAILOVER`` promotes the replica while a task's events are being
delivered; the old primary lives on as a replica. The senders' blocked job reads, their
pooled connections and the jobs' event followers move to the new primary: every event still
arrives, in order (a notification may come twice, with its id, across the switch).
The Cluster path is every other push test: they run on the embedded Redis Cluster too.
"""

from __future__ import annotations

from tests.deployments import SentinelDeployment
from tests.helpers import backend_pair, eventually, start_task
from tests.push.receiver import running_receiver
from tests.push.test_delivery import configure, expected, sender_for, sequence
from tests.push.test_replicas import firsts
from tests.reliability.test_connection_kills import write_until_in

GUARD = 60  # seconds: a hang guard only


async def test_delivery_goes_on_through_a_sentinel_failover(prefix: str) -> None:
    with SentinelDeployment(down_after_ms=5000) as deployment:
        pair = backend_pair(deployment.url, prefix, socket_connect_timeout=1)
        async with running_receiver() as receiver, pair as (a, b):
            senders = [sender_for(a), sender_for(b)]
            for s in senders:
                await s.start()
            try:
                await configure(a, "t", receiver, "x")
                task, version = await start_task(a.task_store)
                for n in range(5):
                    version = await write_until_in(a, task, version, n)
                await eventually(lambda: len(receiver.delivered("x")) >= 6, what="before")
                await deployment.failover(GUARD)
                for n in range(5, 10):
                    version = await write_until_in(a, task, version, n)
                await eventually(
                    lambda: len(firsts(receiver.delivered("x"))) >= 11, what="every event"
                )
                assert sequence(firsts(receiver.delivered("x"))) == expected(9)
            finally:
                for s in senders:
                    await s.aclose()
