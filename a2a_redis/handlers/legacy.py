"""``RedisLegacyRequestHandler``: the SDK's ``LegacyRequestHandler``, correct across replicas.

A subclass (the SDK is not patched); same constructor. With ``RedisQueueManager`` and a
``RedisTaskStore`` it guarantees:

* **Resubscribe never writes.** The replica that runs the agent stores the task (its sender's
  consumer, or the SDK's background consumer once the sender left); a subscriber, on any
  replica, only reads.
* **An agent that raises ends its task FAILED**, and every consumer, local or remote, gets
  that FAILED event, then the end of the stream; the queue is closed and its lease released.
* **A cancel on the replica that runs the agent** stops the agent, ends the sender's stream
  with CANCELED, and once it returned CANCELED nothing else is stored or streamed.
* :meth:`RedisLegacyRequestHandler.cancel_here` is the same cancel, for a CancelTask that
  another replica received; :meth:`~RedisLegacyRequestHandler.runs` says whether it applies.

Where this deviates from the SDK (a2a-sdk 1.3, ``default_request_handler.py``), and why:

1. ``task_store`` is the given store behind a thin wrapper that tells the handler when its
   consumer stored the state at which it stops (terminal or input-required): a cancel
   answers with what the owner stored, and the SDK gives no other signal. A failed save
   (the consumer dies with it) closes that queue at once: the SDK left it undrained, so its
   closes waited forever. Reads and writes pass through unchanged.
2. ``_setup_message_execution`` (called as is) also records the run: the request's call
   context (``cancel_here`` cancels with it; the receiving replica checked the owner), the
   queue, the producer task and its gate (``_runs.py``). ``on_message_send`` and
   ``on_message_send_stream`` are unchanged: their consumer stores every event before the
   client reads it, and ends at the final event.
3. ``_run_event_stream``: the agent writes through a gate, a queue that forwards to the
   task's queue until a cancel takes the task over; after that the dying agent's events are
   dropped, so nothing follows CANCELED. When ``execute`` raises, the SDK closes nothing and
   its consumer re-raises (the stream fails, the task stays WORKING). Here the failure is
   logged with its traceback, a FAILED status event is enqueued (its status message names
   only the exception's type: an exception's text may hold user data or secrets) and the
   queue is closed; the producer returns normally, so each consumer gets FAILED then the
   end: the stream ends cleanly, ``on_message_send`` returns the FAILED task instead of an
   error, remote taps end with QueueShutDown. A failure after the agent's final event (the
   consumer already stopped) changes nothing: the task keeps the state the agent gave it.
   A producer that the SDK cancels (``on_message_send`` does when its consumer fails) ends
   the run too: no cancel then waits for that consumer.
4. ``_cleanup_producer`` runs ``queue_manager.close`` in a ``finally`` (the SDK re-raises
   before it, leaving the queue open and its lease held), ignores ``NoTaskQueue`` (a second
   run on the task closed it), lets a cancel in progress finish first (its CANCELED must go
   into the queue before it closes) and forgets only its own producer.
5. ``on_cancel_task`` where the agent runs: the SDK hands ``cancel`` a tap that the sender
   never reads, then cancels the producer, whose queue nobody closes: the sender's stream
   hangs and CANCELED reaches only the store. Here the cancel closes the gate, calls
   ``AgentExecutor.cancel`` with the task's own queue, stops the producer and waits until it
   ended, adds CANCELED if the agent's cancel did not end the task (FAILED if it raised, as
   V2 does, then re-raises), and answers with what the sender's consumer stored (if that
   save failed: the stored record, when terminal). A task stored CANCELED while its agent
   runs here (a cancel written elsewhere) is cancelled here too, where the SDK raised
   ``TaskNotCancelableError`` and left the agent running. Concurrent cancels share one
   takeover. Where the agent does not run here, the SDK's path is used; an agent on another
   replica is the control plane's job (it calls ``cancel_here`` there).
6. ``on_subscribe_to_task`` reads the task as the SDK does, then taps the queue *before*
   yielding the task (the SDK taps only when the client asks for the next event, so events
   in between were lost), relays the tap's events without a ``TaskManager`` (the SDK saved
   the task again from a stale copy: chunks appended twice, last writer wins), and closes
   its tap when the client leaves. A task without a queue yields the stored task, then ends
   if it waits for input or authentication (as V2 does), else raises ``TaskNotFoundError``
   (as the SDK does).

Residuals: a cancel waits for the sender's consumer, which stores each event only when its
client reads the previous one (a sender that stops reading without leaving holds the cancel,
as it holds the agent), and for ever if that consumer died of an invalid agent event (not a
failed save). If the consumer stopped at a Message or input-required, CANCELED is written
directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

from a2a.server.agent_execution import RequestContext
from a2a.server.cluster import ConcurrentTaskModificationError
from a2a.server.context import ServerCallContext
from a2a.server.events import Event, EventConsumer, EventQueueLegacy
from a2a.server.events.queue_manager import NoTaskQueue
from a2a.server.request_handlers import LegacyRequestHandler
from a2a.server.request_handlers.request_handler import validate, validate_request_params
from a2a.server.tasks import ResultAggregator, TaskManager
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskState,
)
from a2a.utils.errors import TaskNotCancelableError, TaskNotFoundError, UnsupportedOperationError

from a2a_redis.events.control import ControlPlane
from a2a_redis.handlers._runs import (
    CONSUMER_FINAL,
    TERMINAL,
    Gate,
    ReportingStore,
    Run,
    Watch,
    status_event,
)
from a2a_redis.handlers.base import OnControlPlane
from a2a_redis.handlers.cancel import record_cancel
from a2a_redis.stores.task_store import VersionedRedisTaskStore

__all__ = ["RedisLegacyRequestHandler"]

logger = logging.getLogger(__name__)

S = TaskState
INTERRUPTED = frozenset({S.TASK_STATE_INPUT_REQUIRED, S.TASK_STATE_AUTH_REQUIRED})


def _not_cancelable(state: int) -> TaskNotCancelableError:
    return TaskNotCancelableError(
        message=f"Task cannot be canceled - current state: {S.Name(state)}"
    )


class RedisLegacyRequestHandler(OnControlPlane, LegacyRequestHandler):
    """The SDK's ``LegacyRequestHandler`` (same arguments), correct across replicas."""

    def __init__(
        self,
        *args: Any,
        control: ControlPlane | None = None,
        versioned_store: VersionedRedisTaskStore | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._runs: dict[str, Run] = {}
        self.task_store = ReportingStore(self.task_store, self._saved)
        # Across replicas (``RedisBackend.request_handler`` passes both): cancels forwarded
        # to the replica running the agent, else CANCELED recorded version-checked here.
        self._control = control
        self._versioned = versioned_store
        if control is not None:
            control.register(self)

    # -- the control plane's hooks ---------------------------------------------------------
    def runs(self, task_id: str) -> bool:
        """Whether this handler runs ``task_id``'s agent now (a cancel would stop it here)."""
        run = self._runs.get(task_id)
        return run is not None and run.gate.state != "finished"

    async def cancel_here(self, task_id: str) -> Task | None:
        """Cancel ``task_id``'s agent if it runs here; the resulting Task, or None.

        For a CancelTask that another replica received: it cancels as a local CancelTask
        does, in the call context of the request that started the agent, and returns the
        task CANCELED. None if the agent does not run here. Raises as ``on_cancel_task``
        does (``TaskNotCancelableError`` if the task ended otherwise first).
        """
        run = self._runs.get(task_id)
        if run is None or run.gate.state == "finished":
            return None
        return await self._cancel_run(run, run.context)

    # -- cancel ----------------------------------------------------------------------------
    @validate_request_params
    async def on_cancel_task(
        self, params: CancelTaskRequest, context: ServerCallContext
    ) -> Task | None:
        """CancelTask: stop the agent here, or where it runs, or record CANCELED.

        Here if it runs here; else forwarded to where it runs; else CANCELED is recorded
        here, version-checked. Without a control plane: the SDK's path.
        """
        run = self._runs.get(params.id)
        if run is not None and run.gate.state != "finished":
            cancelled = await self._cancel_run(run, context)
            if cancelled is not None:
                return cancelled
        if self._control is None or self._versioned is None:
            result: Task | None = await super().on_cancel_task(params, context)
            return result
        self._start_control()
        task = await self.task_store.get(params.id, context)  # the caller's: owner-scoped
        if task is None:
            raise TaskNotFoundError
        if task.status.state in TERMINAL:
            raise _not_cancelable(task.status.state)
        forwarded = await self._control.forward_cancel(params.id)
        if forwarded is not None:
            return forwarded
        return await self._record_cancel(params.id, context)

    async def _record_cancel(self, task_id: str, context: ServerCallContext) -> Task:
        """CANCELED on the latest stored task; remote taps get it, then their end.

        For a task whose agent runs nowhere that answered.
        """
        assert self._versioned is not None
        try:
            cancelled, _, _ = await record_cancel(self._versioned, task_id, context)
        except ConcurrentTaskModificationError:  # terminal meanwhile
            stored = await self.task_store.get(task_id, context)
            if stored is None:
                raise TaskNotFoundError from None
            if stored.status.state != S.TASK_STATE_CANCELED:
                raise _not_cancelable(stored.status.state) from None
            return stored
        end_taps = getattr(self._queue_manager, "end_taps", None)
        if end_taps is not None:
            await end_taps(task_id)
        return cancelled

    async def _cancel_run(self, run: Run, context: ServerCallContext) -> Task | None:
        """The local cancel; None if the agent ended on its own before the cancel took it."""
        task = await self.task_store.get(run.task_id, context)  # scoped to the caller
        if task is None:
            raise TaskNotFoundError
        # CANCELED stored while the agent runs here (a cancel written elsewhere): stop it.
        if task.status.state in TERMINAL - {S.TASK_STATE_CANCELED}:
            raise TaskNotCancelableError(
                message=f"Task cannot be canceled - current state: {S.Name(task.status.state)}"
            )
        if run.takeover is None:
            run.takeover = asyncio.create_task(
                self._take_over(run, task, context), name=f"cancel:{run.task_id}"
            )
        result = await asyncio.shield(run.takeover)  # a caller that leaves does not stop it
        if result is not None and result.status.state != S.TASK_STATE_CANCELED:
            raise TaskNotCancelableError(
                message=f"Task cannot be canceled - current state: {S.Name(result.status.state)}"
            )
        return result

    async def _take_over(self, run: Run, task: Task, context: ServerCallContext) -> Task | None:
        try:
            async with run.gate.lock:
                if run.gate.state != "open":
                    return None
                run.gate.state = "taken"  # the agent's later events are dropped from here
            watch = Watch(run.queue)
            request = RequestContext(call_context=context, request=None, task_id=task.id,
                                     context_id=task.context_id, task=task)  # fmt: skip
            failure: Exception | None = None
            try:
                await self.agent_executor.cancel(request, watch)
            except Exception as e:
                logger.exception("task %r: the agent's cancel failed", run.task_id)
                failure = e
            finally:
                run.producer.cancel()
                await asyncio.wait({run.producer})  # stopped before anything is answered
            state, text = S.TASK_STATE_CANCELED, "The task was canceled."
            if failure is not None:
                state = S.TASK_STATE_FAILED
                text = f"The agent failed to cancel ({type(failure).__name__})."
            if not watch.ended:
                await run.queue.enqueue_event(status_event(task.id, task.context_id, state, text))
            result = await self._stored_end(run, task, context, state, text)
            if failure is not None:
                raise failure
            return result
        finally:
            run.taken_over = True
            self._forget(run)

    async def _stored_end(
        self, run: Run, task: Task, context: ServerCallContext, state: int, text: str
    ) -> Task:
        """What the sender's consumer stored last, or ``state`` written here.

        Written here when the consumer stopped before a terminal state (at a Message or
        input-required): it is gone, so there is no race.
        """
        if not (run.queue.is_closed() and run.gate.replied):
            final = await asyncio.shield(run.final)
            if final is None:  # the consumer's save failed (and ended it): read the record
                final = await self.task_store.get(task.id, context)
            if final is not None and final.status.state in TERMINAL:
                return final
        manager = TaskManager(
            task_id=task.id,
            context_id=task.context_id,
            task_store=self.task_store,
            initial_message=None,
            context=context,
        )
        stored = await manager.save_task_event(status_event(task.id, task.context_id, state, text))
        assert stored is not None
        return stored

    async def _saved(self, task: Task, ok: bool) -> None:
        """Note a save through this handler for the run's ``final``.

        The first save where a consumer stops is its final one. A failed save ends the
        consumer too (say, a terminal state stored elsewhere was kept), so its queue closes
        at once: nothing waits on it any more, and the agent's later events are dropped.
        """
        run = self._runs.get(task.id)
        if run is None or run.final.done():
            return
        if not ok:
            run.final.set_result(None)
            try:
                await run.queue.close(immediate=True)
            except Exception:  # the save's own error is the one to raise
                logger.warning("task %r: closing its queue failed", task.id, exc_info=True)
        elif task.status.state in CONSUMER_FINAL:
            final = Task()
            final.CopyFrom(task)
            run.final.set_result(final)

    # -- running the agent -----------------------------------------------------------------
    async def _setup_message_execution(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> tuple[TaskManager, str, EventQueueLegacy, ResultAggregator, asyncio.Task[Any]]:
        setup = await super()._setup_message_execution(params, context)
        _, task_id, queue, _, producer = setup
        # The producer has not run yet (nothing awaited since it was created): it finds this.
        self._runs[task_id] = Run(task_id, context, queue, producer, Gate(queue),
                                   asyncio.get_running_loop().create_future())  # fmt: skip
        return setup

    async def _run_event_stream(self, request: RequestContext, queue: EventQueueLegacy) -> None:
        run = self._runs.get(str(request.task_id))
        mine = run is not None and run.producer is asyncio.current_task()
        gate = run.gate if run is not None and mine else Gate(queue)
        try:
            await self.agent_executor.execute(request, gate)
        except asyncio.CancelledError:
            # Not by a cancel's takeover (that is no failure): the SDK stopped the producer
            # because its consumer failed; no cancel may wait for that consumer now.
            if gate.state == "open":
                gate.state = "finished"
            raise
        except Exception as e:
            await self._end(gate, request, e)
        else:
            await self._end(gate, request, None)

    async def _end(self, gate: Gate, request: RequestContext, failure: Exception | None) -> None:
        """The agent returned or raised: end the run, unless a cancel took it over."""
        task_id = str(request.task_id)
        async with gate.lock:
            if gate.state != "open":
                if failure is not None:
                    logger.info("task %r: the agent raised %s while being canceled",
                                task_id, type(failure).__name__)  # fmt: skip
                return
            gate.state = "finished"
            try:
                if failure is not None:
                    logger.error("task %r: the agent raised %s; the task ends FAILED",
                                 task_id, type(failure).__name__, exc_info=failure)  # fmt: skip
                    if gate.queue.is_closed():
                        logger.warning("task %r: the agent raised after its final event; "
                                       "the task keeps its state", task_id)  # fmt: skip
                    else:
                        text = f"The agent failed ({type(failure).__name__})."
                        context_id = str(request.context_id or "")
                        event = status_event(task_id, context_id, S.TASK_STATE_FAILED, text)
                        await gate.queue.enqueue_event(event)
            finally:
                await gate.queue.close()

    async def _cleanup_producer(self, producer_task: asyncio.Task[Any], task_id: str) -> None:
        run = self._runs.get(task_id)
        run = run if run is not None and run.producer is producer_task else None
        try:
            await producer_task
        except asyncio.CancelledError:
            logger.debug("task %r: the producer was cancelled", task_id)
        except Exception:  # not the agent's failure (that ended the task FAILED)
            logger.exception("task %r: the producer failed", task_id)
        finally:
            try:
                if run is not None and run.takeover is not None:
                    # Its CANCELED must be in the queue before the queue closes.
                    await asyncio.gather(asyncio.shield(run.takeover), return_exceptions=True)
                try:
                    await self._queue_manager.close(task_id)
                except NoTaskQueue:
                    logger.debug("task %r: its queue was closed already", task_id)
            finally:
                with self._running_agents_lock:
                    if self._running_agents.get(task_id) is producer_task:
                        del self._running_agents[task_id]
                if run is not None:
                    self._forget(run)

    def _forget(self, run: Run) -> None:
        """Drop the run once its producer ended and no cancel needs it any more."""
        if not run.producer.done() or (run.takeover is not None and not run.taken_over):
            return
        if self._runs.get(run.task_id) is run:
            del self._runs[run.task_id]

    # -- resubscribe -----------------------------------------------------------------------
    @validate_request_params
    @validate(
        lambda self: self._agent_card.capabilities.streaming,
        "Streaming is not supported by the agent",
    )
    async def on_subscribe_to_task(
        self, params: SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event, None]:
        """SubscribeToTask: the stored task, then every later event of the task; no write."""
        task = await self.task_store.get(params.id, context)
        if task is None:
            raise TaskNotFoundError
        if task.status.state in TERMINAL:
            raise UnsupportedOperationError(
                message=f"Task {task.id} is in terminal state: {S.Name(task.status.state)}"
            )
        queue = await self._queue_manager.tap(task.id)
        if queue is None:  # no agent runs it: the stored task (as the SDK), then the end
            yield task
            if task.status.state in INTERRUPTED:
                return  # waiting for input: nothing will come until a message (as V2)
            raise TaskNotFoundError  # the SDK's answer when no queue is open
        try:
            yield task
            async for event in EventConsumer(queue).consume_all():
                yield event
        finally:
            await queue.close(immediate=True)
