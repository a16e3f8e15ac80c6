"""``RedisPushNotificationSender``: push notifications delivered from Redis, with retries.

The SDK's ``BasePushNotificationSender`` POSTs inline, once, from the replica that saved the
event. Here the durable record decides instead:

* **The record.** Every event the SDK pushes is already in the task's event log (the
  versioned store's save appends it in the same MULTI/EXEC). ``set_info`` of a config adds
  a *job* for (task, config) to ``keys.push_jobs`` (the store does it once
  :meth:`RedisPushNotificationConfigStore.record_deliveries` is on). So
  :meth:`send_notification` costs nothing: no command, no wait, and a replica that dies
  right after a save, or never calls it, loses nothing. Tasks without configs cost nothing.
  With the legacy handler the record is the queue's log (appended at enqueue, at version
  0), followed by stream position (``push/positions.py``).
* **Workers.** Every replica's sender reads jobs with ``XREADGROUP`` in one consumer group
  (``scripts.GROUP``). Each job (``push/jobs.py``) follows its task's log from the config's
  cursor and POSTs each event in order; at most ``max_in_flight`` requests are in flight
  per replica. A job is acknowledged (``XACK`` + ``XDEL``) only after its outcome is
  recorded. The holder resets its jobs' idle time every ``claim_after / 3``; jobs of a
  replica that stopped doing so are taken over with ``XAUTOCLAIM`` after ``claim_after``.
* **At least once.** A take-over resumes at the cursor: the event in flight when a
  replica died may be POSTed twice, with the same ``X-A2A-Notification-Id``.
* **Dead letters.** A notification out of attempts, out of ``max_age``, or answered with a
  final 4xx goes to ``keys.push_dead`` (``MAXLEN ~ dead_maxlen``, expiring ``dead_ttl``
  after the last one) with its last error: a status or an exception class, never a body,
  URL or header.

Round trips per event per config: one HGET (the config, so deletes and edits apply at
once), the POST, one EVALSHA (the cursor); the backlog reads are shared with subscribers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import uuid
from collections.abc import Collection
from typing import Any, cast

import httpx
from a2a.server.tasks.push_notification_sender import PushNotificationEvent, PushNotificationSender
from a2a.types.a2a_pb2 import TaskPushNotificationConfig
from redis import exceptions as rex

from a2a_redis import telemetry
from a2a_redis.connection.cluster import Client
from a2a_redis.errors import A2ARedisError, CorruptDataError, redis_errors
from a2a_redis.events.event_stream import RedisTaskEventStream
from a2a_redis.log.codec import utf8
from a2a_redis.push import scripts
from a2a_redis.push.jobs import Job
from a2a_redis.push.policy import RetryPolicy, UrlValidator, default_url_validator
from a2a_redis.stores.push_config_store import RedisPushNotificationConfigStore

__all__ = ["COUNTERS", "METRIC_PREFIX", "RedisPushNotificationSender"]

logger = logging.getLogger(__name__)

#: The counters of :meth:`RedisPushNotificationSender.stats`.
COUNTERS = ("delivered", "retried", "dead", "claimed", "refused")
#: The prefix of :meth:`RedisPushNotificationSender.metrics`' names.
METRIC_PREFIX = "a2a_redis.push."
_BATCH = 100  # jobs read or claimed per command
_CLOSE_WAIT = 5.0  # seconds aclose waits for cancelled jobs
_BLOCK_MS = 2000  # XREADGROUP BLOCK: under common socket timeouts (5 s), never 0


def _metric(name: str, sender: RedisPushNotificationSender) -> int:
    return sender.metrics()[name]


class RedisPushNotificationSender(PushNotificationSender):
    """Delivers push notifications from Redis; see the module docstring.

    Args:
        redis: The shared client (``decode_responses=False``); not owned.
        config_store: The push-config store; its ``record_deliveries`` is switched on.
        event_stream: The event stream whose logs the jobs follow.
        httpx_client: An ``httpx.AsyncClient`` to POST with (not owned); None makes one
            with ``connect_timeout``/``read_timeout`` and no redirects, closed by
            :meth:`aclose`.
        push_url_validator: ``async (url) -> bool``, e.g. the SDK's
            ``validate_push_notification_url``; None: :func:`default_url_validator` with
            ``allow_hosts``. A validator that raises refuses (fail closed).
        allow_hosts: Hosts the default policy accepts without resolving them.
        max_in_flight: Requests in flight per replica (default 64).
        max_jobs: Jobs (task, config) one replica follows at once (default 10,000).
        claim_after: Seconds after which a silent replica's jobs are taken over (30).
        retry: The :class:`RetryPolicy` (default: 10 attempts within 1 h).
        connect_timeout, read_timeout: Seconds, for the client made here (5 and 10).
        dead_maxlen: Dead letters kept (``MAXLEN ~``, default 10,000).
        dead_ttl: Seconds the dead-letter stream lives after its last entry (7 days).
    """

    def __init__(
        self,
        redis: Client,
        config_store: RedisPushNotificationConfigStore,
        event_stream: RedisTaskEventStream,
        *,
        httpx_client: httpx.AsyncClient | None = None,
        push_url_validator: UrlValidator | None = None,
        allow_hosts: Collection[str] = (),
        max_in_flight: int = 64,
        max_jobs: int = 10_000,
        claim_after: float = 30.0,
        retry: RetryPolicy | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        dead_maxlen: int = 10_000,
        dead_ttl: float = 7 * 86400.0,
    ) -> None:
        if max_in_flight < 1 or max_jobs < 1 or dead_maxlen < 1:
            raise ValueError("max_in_flight, max_jobs and dead_maxlen must be positive")
        if not (claim_after > 0 and dead_ttl > 0 and connect_timeout > 0 and read_timeout > 0):
            raise ValueError("claim_after, dead_ttl and the timeouts must be positive seconds")
        self.redis = redis
        self.config_store = config_store
        self.event_stream = event_stream
        self.keys = config_store.keys
        self.retry = retry or RetryPolicy()
        self.validator = push_url_validator or default_url_validator(allow_hosts)
        self.max_jobs = max_jobs
        self.claim_after = claim_after
        self.dead_maxlen = dead_maxlen
        self._dead_ttl_ms = max(1, round(dead_ttl * 1000))
        self._owns_http = httpx_client is None
        self.http = httpx_client or httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_in_flight),
            follow_redirects=False,
        )
        self._slots = asyncio.Semaphore(max_in_flight)
        self.consumer = uuid.uuid4().hex[:16]
        self.scripts = {
            "adopt": redis.register_script(scripts.ADOPT),
            "advance": redis.register_script(scripts.ADVANCE),
            "finish": redis.register_script(scripts.FINISH),
            "renew": redis.register_script(scripts.RENEW),
        }
        self._jobs: dict[bytes, asyncio.Task[None]] = {}
        self._room = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._closed = False
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._in_flight = 0
        for name in self.metrics():  # the same counts in OpenTelemetry (``telemetry``)
            telemetry.observe(name, self, functools.partial(_metric, name))
        config_store.record_deliveries(True, on_use=self.ensure_started)

    # -- the SDK's interface -------------------------------------------------------------
    async def send_notification(self, task_id: str, event: PushNotificationEvent) -> None:
        """Nothing to send here: the save recorded the event, and the workers deliver it.

        No round trip, no HTTP; it starts this replica's workers if they are not running.
        """
        self.ensure_started()

    # -- lifecycle -----------------------------------------------------------------------
    def ensure_started(self) -> None:
        """Start the workers if a loop is running here and they are not started."""
        if self._loops or self._closed:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._loops = [
            asyncio.ensure_future(self._read_loop()),
            asyncio.ensure_future(self._upkeep_loop()),
        ]

    async def start(self) -> None:
        """Start this replica's workers (idempotent)."""
        self.ensure_started()

    async def aclose(self) -> None:
        """Stop the workers; held jobs are taken over by another replica after claim_after."""
        self._closed = True
        tasks = [*self._loops, *self._jobs.values()]
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a job's log follower may take its time to unsubscribe
            _, late = await asyncio.wait(tasks, timeout=_CLOSE_WAIT)
            if late:
                logger.warning("%d push job(s) still closing after %g s", len(late), _CLOSE_WAIT)
        self._loops.clear()
        if self._owns_http:
            await self.http.aclose()

    def stats(self) -> dict[str, Any]:
        """This replica's delivery: running, jobs held, requests in flight, and counters.

        The counters count since start: ``delivered`` notifications, ``retried`` attempts
        (each failed attempt followed by another), ``dead`` letters written, ``claimed``
        jobs taken over from a silent replica, ``refused`` configs (URL policy).
        """
        return {
            "running": bool(self._loops) and not self._closed,
            "jobs": len(self._jobs),
            "in_flight": self._in_flight,
            **self._counts,
        }

    def metrics(self) -> dict[str, int]:
        """:meth:`stats` as metric names: ``a2a_redis.push.delivered`` and so on.

        Counters (monotonic): ``delivered``, ``retried``, ``dead``, ``claimed``, ``refused``;
        gauges: ``in_flight`` (requests) and ``jobs`` (held by this replica).
        """
        gauges = {"in_flight": self._in_flight, "jobs": len(self._jobs)}
        return {f"{METRIC_PREFIX}{k}": v for k, v in {**self._counts, **gauges}.items()}

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called (jobs stop at their next step)."""
        return self._closed

    def count(self, what: str, n: int = 1) -> None:
        """Count ``n`` outcomes (one of :data:`COUNTERS`)."""
        self._counts[what] += n

    # -- jobs ------------------------------------------------------------------------------
    async def _ensure_group(self) -> None:
        with redis_errors("create push consumer group", self.keys.push_jobs):
            try:
                await self.redis.xgroup_create(
                    self.keys.push_jobs, scripts.GROUP, id="0", mkstream=True
                )
            except rex.ResponseError as e:
                if not str(e).startswith("BUSYGROUP"):
                    raise

    async def _read_loop(self) -> None:
        key, ready, failures = self.keys.push_jobs, False, 0
        while not self._closed:
            try:
                if not ready:
                    await self._ensure_group()
                    ready = True
                free = self.max_jobs - len(self._jobs)
                if free <= 0:
                    self._room.clear()
                    await self._room.wait()
                    continue
                with redis_errors("read push jobs", key):
                    reply = await self.redis.xreadgroup(
                        scripts.GROUP,
                        self.consumer,
                        {key: b">"},
                        count=min(free, _BATCH),
                        block=_BLOCK_MS,
                    )
                for _, entries in _streams(reply):
                    self._start_jobs(entries)
                failures = 0
            except rex.ResponseError as e:
                ready = not str(e).startswith("NOGROUP")  # the stream was deleted: recreate
                if ready:
                    failures = await self._pause("read push jobs", e, failures)
            except (A2ARedisError, rex.RedisError) as e:
                failures = await self._pause("read push jobs", e, failures)

    async def _upkeep_loop(self) -> None:
        failures = 0
        while not self._closed:
            await asyncio.sleep(self.claim_after / 3 * random.uniform(0.8, 1.0))
            try:
                await self._renew()
                await self._claim()
                failures = 0
            except (A2ARedisError, rex.RedisError) as e:
                failures = await self._pause("renew push jobs", e, failures)

    async def _pause(self, what: str, error: Exception, failures: int) -> int:
        delay = min(5.0, 0.1 * 2**failures) * random.uniform(0.5, 1.0)
        logger.warning("%s: %s; again in %.2f s", what, error, delay)
        await asyncio.sleep(delay)
        return failures + 1

    async def _renew(self) -> None:
        held = list(self._jobs)
        for i in range(0, len(held), 500):
            args: list[Any] = [scripts.GROUP, self.consumer, *held[i : i + 500]]
            with redis_errors("renew push jobs", self.keys.push_jobs):
                lost = await self.scripts["renew"](keys=[self.keys.push_jobs], args=args)
            for job_id in cast("list[bytes]", lost):
                task = self._jobs.pop(job_id, None)
                if task is not None:
                    logger.warning("push job %s was taken over by another replica", job_id)
                    task.cancel()

    async def _claim(self) -> None:
        free = self.max_jobs - len(self._jobs)
        if free <= 0:
            return
        with redis_errors("claim push jobs", self.keys.push_jobs):
            reply = await self.redis.xautoclaim(
                self.keys.push_jobs, scripts.GROUP, self.consumer,
                min_idle_time=round(self.claim_after * 1000), start_id="0-0",
                count=min(free, _BATCH),
            )  # fmt: skip
        entries = reply[1] if isinstance(reply, list | tuple) and len(reply) > 1 else []
        if entries:
            logger.info("claimed %d push job(s) of a silent replica", len(entries))
            self.count("claimed", len(entries))
        self._start_jobs(entries)

    def _start_jobs(self, entries: Any) -> None:
        for job_id, fields in entries:
            if job_id in self._jobs or fields is None:
                continue
            task_raw, field = fields.get(b"t"), fields.get(b"f")
            if not isinstance(task_raw, bytes) or not isinstance(field, bytes):
                error = CorruptDataError(
                    f"push job {job_id!r} is malformed", key=self.keys.push_jobs
                )
                logger.warning("%s; dropped", error)
                self._jobs[job_id] = asyncio.ensure_future(self.acknowledge(job_id))
            else:
                task_id = task_raw.decode("utf-8", "surrogatepass")
                job = Job(self, job_id, task_id, field)
                replay = _versions(fields.get(b"r"))
                self._jobs[job_id] = asyncio.ensure_future(job.run(replay))
            self._jobs[job_id].add_done_callback(functools.partial(self._done, job_id))

    def _done(self, job_id: bytes, _: object) -> None:
        self._jobs.pop(job_id, None)
        self._room.set()

    async def acknowledge(self, job_id: bytes) -> None:
        """Acknowledge and delete a finished job: one round trip (XACK + XDEL)."""
        key = self.keys.push_jobs
        with redis_errors("acknowledge push job", key):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xack(key, scripts.GROUP, job_id)
                pipe.xdel(key, job_id)
                await pipe.execute()

    async def is_pending(self, job_id: bytes) -> bool:
        """Whether ``job_id`` is still held by some consumer (one round trip)."""
        with redis_errors("read pending push jobs", self.keys.push_jobs):
            rows = await self.redis.xpending_range(
                self.keys.push_jobs, scripts.GROUP, job_id, job_id, 1
            )
        return bool(rows)

    # -- delivery ----------------------------------------------------------------------------
    async def url_allowed(self, url: str) -> bool:
        """The URL policy's verdict; a validator that raises refuses."""
        try:
            return bool(await self.validator(url))
        except Exception as e:
            logger.warning("push URL validator raised %s: refused", type(e).__name__)
            return False

    async def post(
        self, url: str, body: Any, headers: dict[str, str]
    ) -> tuple[int | None, str | None, str | None]:
        """One POST: ``(status, error, Retry-After)``; ``error`` is None on a 2xx."""
        async with self._slots:
            self._in_flight += 1
            try:
                response = await self.http.post(url, json=body, headers=headers)
            except httpx.HTTPError as e:
                return None, type(e).__name__, None
            finally:
                self._in_flight -= 1
        if 200 <= response.status_code < 300:
            return response.status_code, None, None
        error = f"HTTP {response.status_code}"
        return response.status_code, error, response.headers.get("retry-after")

    async def dead_letter(
        self,
        task_id: str,
        config: TaskPushNotificationConfig,
        field: bytes,
        version: int,
        nid: str,
        error: str,
        attempts: int,
    ) -> None:
        """Record a notification that could not be delivered: one round trip."""
        key = self.keys.push_dead
        owner = field.partition(b":")[0]
        entry = {
            b"t": utf8(task_id), b"f": field, b"c": utf8(config.id), b"o": owner,
            b"v": b"%d" % version, b"n": nid.encode(), b"e": error.encode(),
            b"k": b"%d" % attempts,
        }  # fmt: skip
        with redis_errors("record push dead letter", key):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(key, entry, maxlen=self.dead_maxlen, approximate=True)  # type: ignore[arg-type]
                pipe.pexpire(key, self._dead_ttl_ms)
                await pipe.execute()
        self.count("dead")
        logger.warning(
            "push %s of task %r to config %r dead-lettered after %d attempt(s): %s",
            nid, task_id, config.id, attempts, error,
        )  # fmt: skip


def _versions(raw: Any) -> list[int] | None:
    """A replay job's versions (``"3,4,5"``); None for a delivery job."""
    if not isinstance(raw, bytes):
        return None
    return [int(v) for v in raw.split(b",") if v.isdigit()]


def _streams(reply: Any) -> list[tuple[Any, Any]]:
    """XREADGROUP's reply as (stream, entries) pairs, RESP2 (a list) or RESP3 (a map)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(stream, entries) for stream, entries in reply]
