"""Calls from the leader to workers: the effects of durable decisions.

Every call carries the leader's epoch in the ``jobledger-leader-epoch``
metadata entry, so a worker can reject a deposed leader. Calls run in the
background; what they report back (a deployment's outcome, a trigger that
did not arrive) becomes a command of the same epoch, ignored once the
leadership has moved on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

import observability
from coordinator import checkpoints, jobs, taskmanagers
from coordinator.config import CoordinatorConfig
from coordinator.decision import (
    CancelTask,
    DeployTask,
    DiscardSnapshots,
    Effect,
    NotifyCheckpointAborted,
    NotifyCheckpointComplete,
    TriggerCheckpoint,
)
from coordinator.engine import Engine
from coordinator.errors import NotLeader
from observability import spans
from observability.propagation import extract
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc

logger = logging.getLogger(__name__)

EPOCH_METADATA_KEY = "jobledger-leader-epoch"

# The full names of the worker's gRPC services that the coordinator calls.
TASK_EXECUTION = fpb.DESCRIPTOR.services_by_name["TaskExecution"].full_name
CHECKPOINTING = fpb.DESCRIPTOR.services_by_name["TaskManagerCheckpointing"].full_name
CONTROL = svc.DESCRIPTOR.services_by_name["TaskManagerControl"].full_name

_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class EpochChanged(Exception):
    """The leadership that decided a call moved on; the call is dropped."""


def _is_refused(exc: grpc.aio.AioRpcError) -> bool:
    """Return whether no server listens at the address the call went to.

    gRPC reports a refused TCP connection as UNAVAILABLE with the socket
    error in the details ("Connection refused" in grpcio 1.85). Retrying does
    not help, because a restarted worker process registers anew, so nothing
    serves the registration the call was made for again.

    NOTE: the match is on gRPC's wording. Should a later grpcio word it
    otherwise, a refused call is retried like any UNAVAILABLE one and still
    ends the registration once the retries run out.
    """
    return (
        exc.code() == grpc.StatusCode.UNAVAILABLE
        and "connection refused" in (exc.details() or "").lower()
    )


def _is_transient(exc: BaseException) -> bool:
    return (
        isinstance(exc, grpc.aio.AioRpcError)
        and exc.code() in _TRANSIENT
        and not _is_refused(exc)
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class WorkerCalls:
    """Runs effects against workers, one background task per call."""

    def __init__(self, engine: Engine, config: CoordinatorConfig) -> None:
        self._engine = engine
        self._config = config
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, effects: list[Effect], epoch: int) -> None:
        """Start the calls of a durable decision made at ``epoch``."""
        for effect in effects:
            task = asyncio.create_task(self._run(effect, epoch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def cancel_all(self) -> None:
        """Cancel every call in flight, e.g. when leadership is lost."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel the calls in flight and close every channel. Safe to call twice."""
        await self.cancel_all()
        channels = list(self._channels.values())
        self._channels.clear()
        for channel in channels:
            await channel.close()

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            # Each call records its own span (spans.call_traced) instead of
            # going through the gRPC instrumentation's interceptors.
            channel = grpc.aio.insecure_channel(endpoint)
            self._channels[endpoint] = channel
        return channel

    async def _run(self, effect: Effect, epoch: int) -> None:
        if not effect.endpoint:
            logger.warning("no endpoint for task manager %s", effect.task_manager_id)
            return
        try:
            if isinstance(effect, DeployTask):
                await self._deploy(effect, epoch)
            elif isinstance(effect, TriggerCheckpoint):
                await self._trigger(effect, epoch)
            else:
                await self._notify(effect, epoch)
        except (EpochChanged, NotLeader):
            logger.debug("call to %s dropped: epoch %d ended", effect.endpoint, epoch)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception(
                "call to task manager %s at %s failed unexpectedly",
                effect.task_manager_id,
                effect.endpoint,
            )

    async def _call(
        self,
        epoch: int,
        method: tuple[str, str],
        call: Callable[[spans.Metadata], Awaitable[Any]],
        timeout_s: float,
        still_needed: Callable[[], bool] = lambda: True,
    ) -> Any:
        """Make one call with retries on transient failures, while at ``epoch``.

        ``method`` is the full gRPC service name and the method name, for
        the span of each attempt. Raises EpochChanged once the leadership
        moved on or ``still_needed`` returns False.
        """
        metadata = ((EPOCH_METADATA_KEY, str(epoch)),)
        retrying = AsyncRetrying(
            stop=stop_after_delay(timeout_s),
            wait=wait_exponential_jitter(multiplier=0.05, max=1.0, jitter=0.05),
            retry=retry_if_exception(_is_transient),
            reraise=True,
        )
        service, name = method
        async for attempt in retrying:
            with attempt:
                if not self._engine.leads_at(epoch) or not still_needed():
                    raise EpochChanged()
                return await spans.call_traced(service, name, call, metadata)
        raise AssertionError("tenacity ended without a result")

    async def _deploy(self, effect: DeployTask, epoch: int) -> None:
        if not observability.tracing_enabled():
            await self._deploy_once(effect, epoch)
            return
        attributes: dict[str, AttributeValue] = {
            spans.JOB: effect.job_id,
            spans.TASK: effect.task_id,
            spans.ATTEMPT: effect.attempt,
            spans.TASK_MANAGER: effect.task_manager_id,
        }
        # A redeployment after a failover, made by a timer, joins the
        # failover's trace; any other deployment hangs below the current span.
        parent = None
        if not trace.get_current_span().get_span_context().is_valid:
            parent = spans.recovery_context(self._engine.state, effect.job_id)
        with observability.tracer().start_as_current_span(
            "task.deploy", context=parent, attributes=attributes
        ):
            await self._deploy_once(effect, epoch)

    async def _deploy_once(self, effect: DeployTask, epoch: int) -> None:
        stub = fpb_grpc.TaskExecutionStub(self._channel(effect.endpoint))
        timeout = self._config.worker_call_timeout_s
        try:
            response = await self._call(
                epoch,
                (TASK_EXECUTION, "DeployTask"),
                lambda md: stub.DeployTask(effect.descriptor, metadata=md, timeout=5),
                timeout,
            )
            ok, message = response.success, response.message
        except grpc.aio.AioRpcError as exc:
            ok, message = False, _describe(exc)
            # The loss fails the task first, so the deployment result below
            # changes nothing and the job fails over once, away from the
            # worker, instead of being placed on it again.
            await self._lose_if_unreachable(effect, epoch, "DeployTask", exc)
        if not ok:
            logger.warning(
                "deployment of task %s attempt %d of job %s to %s failed: %s",
                effect.task_id,
                effect.attempt,
                effect.job_id,
                effect.task_manager_id,
                message,
            )
        await self._engine.execute_at(
            epoch,
            jobs.decide_deploy_result,
            effect.job_id,
            effect.task_id,
            effect.attempt,
            ok,
            message,
        )

    async def _trigger(self, effect: TriggerCheckpoint, epoch: int) -> None:
        stub = fpb_grpc.TaskManagerCheckpointingStub(self._channel(effect.endpoint))
        request = effect.request
        if request.trace_context:
            # This call runs in its own asyncio task, so the checkpoint's
            # context stays current for this call alone.
            otel_context.attach(extract(request.trace_context))
        try:
            response = await self._call(
                epoch,
                (CHECKPOINTING, "TriggerTaskCheckpoint"),
                lambda md: stub.TriggerTaskCheckpoint(request, metadata=md, timeout=5),
                min(self._config.worker_call_timeout_s, 10.0),
                still_needed=lambda: self._pending(request.checkpoint_id),
            )
            rejected = not response.acknowledged
            reason = "no source of the job runs there" if rejected else ""
        except grpc.aio.AioRpcError as exc:
            rejected = False
            reason = _describe(exc)
            # A worker that cannot be reached to trigger a checkpoint cannot
            # run its tasks either, so it is lost at once rather than after
            # the heartbeat timeout. Failing only the checkpoint would leave
            # the dead worker's slots offered, so a failover could use them.
            await self._lose_if_unreachable(effect, epoch, "TriggerTaskCheckpoint", exc)
        if reason:
            logger.warning(
                "trigger of checkpoint %d of job %s on %s failed: %s",
                request.checkpoint_id,
                request.job_id,
                effect.task_manager_id,
                reason,
            )
            await self._engine.execute_at(
                epoch,
                checkpoints.decide_trigger_failed,
                request.checkpoint_id,
                effect.task_manager_id,
                reason,
                rejected,
            )

    def _pending(self, checkpoint_id: int) -> bool:
        checkpoint = self._engine.state.checkpoints.get(checkpoint_id)
        return checkpoint is not None and checkpoint.status == pb.CHECKPOINT_PENDING

    async def _notify(
        self,
        effect: NotifyCheckpointComplete
        | NotifyCheckpointAborted
        | CancelTask
        | DiscardSnapshots,
        epoch: int,
    ) -> None:
        stub = svc_grpc.TaskManagerControlStub(self._channel(effect.endpoint))
        # Each of these effects is named after the RPC that carries it.
        name = type(effect).__name__
        method: Any = getattr(stub, name)
        request = effect.request
        try:
            await self._call(
                epoch,
                (CONTROL, name),
                lambda md: method(request, metadata=md, timeout=5),
                self._config.worker_call_timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            logger.warning(
                "%s to task manager %s failed: %s",
                type(effect).__name__,
                effect.task_manager_id,
                _describe(exc),
            )
            # A CancelTask refused at a failover is often the first sign of a
            # dead worker, and losing it then keeps the restart off its slots.
            await self._lose_if_unreachable(effect, epoch, type(effect).__name__, exc)

    async def _lose_if_unreachable(
        self, effect: Effect, epoch: int, call: str, exc: grpc.aio.AioRpcError
    ) -> None:
        """Declare the call's registration lost when the worker was unreachable.

        Only UNAVAILABLE after the retries counts, and a refused connection
        is not retried. Any response from the worker, even a rejection, shows
        that it is running. A call that timed out (DEADLINE_EXCEEDED) is left
        to the heartbeat timeout, because a busy worker may respond late. Safe
        to call for a registration that has ended, since the decision then
        writes nothing.
        """
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            return
        await self._engine.execute_at(
            epoch,
            taskmanagers.decide_unreachable,
            effect.task_manager_id,
            effect.registration_id,
            call,
            _describe(exc),
        )
