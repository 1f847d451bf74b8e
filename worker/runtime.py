"""The tasks of one worker: deploying, cancelling, checkpoint calls, reports."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobledger_types_pb2 as types_pb
from protos import jobmanager_internal_pb2 as fpb
from worker.coordinator_client import CoordinatorClient, Stubs
from worker.task import (
    DescriptorError,
    Task,
    TaskConfigError,
    TaskEnvironment,
    TaskKey,
    build_task,
)

logger = logging.getLogger(__name__)

# Seconds a report to the coordinator keeps being retried before it is
# dropped; the coordinator's heartbeat timeout covers what is lost.
REPORT_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class DeployRejection:
    """The reason an attempt cannot run, and whether a new attempt could.

    ``recoverable`` is False when the task's configuration causes the
    failure, so every new attempt of the job would fail the same way.
    """

    reason: str
    recoverable: bool = True


class CoordinatorReporter:
    """Sends task reports to the leading coordinator, with retries."""

    def __init__(self, client: CoordinatorClient, task_manager_id: str) -> None:
        self._client = client
        self._task_manager_id = task_manager_id

    async def task_status(
        self, key: TaskKey, status: pb.TaskStatus.ValueType, reason: str
    ) -> None:
        request = svc.UpdateTaskStatusRequest(
            job_id=key.job_id,
            job_vertex_id=key.vertex_id,
            subtask_index=key.subtask_index,
            attempt=key.attempt,
            status=status,
            reason=reason,
            task_manager_id=self._task_manager_id,
        )
        await self._send(
            f"UpdateTaskStatus {pb.TaskStatus.Name(status)} of {key}",
            lambda stubs, timeout: stubs.reporting.UpdateTaskStatus(
                request, timeout=timeout
            ),
        )

    async def acknowledge(self, request: fpb.AcknowledgeCheckpointRequest) -> None:
        await self._send(
            f"AcknowledgeCheckpoint {request.checkpoint_id} of "
            f"{request.job_vertex_id}_{request.subtask_index}",
            lambda stubs, timeout: stubs.registration.AcknowledgeCheckpoint(
                request, timeout=timeout
            ),
        )

    async def decline(self, request: fpb.ReportFailedCheckpointRequest) -> None:
        await self._send(
            f"ReportFailedCheckpoint {request.checkpoint_id} of "
            f"{request.job_vertex_id}_{request.subtask_index}",
            lambda stubs, timeout: stubs.internal.ReportFailedCheckpoint(
                request, timeout=timeout
            ),
        )

    async def startup_failure(
        self, request: fpb.ReportTaskStartupFailureRequest
    ) -> None:
        await self._send(
            f"ReportTaskStartupFailure of {request.job_vertex_id}_"
            f"{request.subtask_index}",
            lambda stubs, timeout: stubs.internal.ReportTaskStartupFailure(
                request, timeout=timeout
            ),
        )

    async def _send(
        self, name: str, invoke: Callable[[Stubs, float], Awaitable[Any]]
    ) -> None:
        try:
            await self._client.call(name, invoke, REPORT_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            logger.warning("%s failed: %s: %s", name, exc.code().name, exc.details())


class Runtime:
    """Owns the worker's task attempts, at most one running per subtask."""

    def __init__(
        self, environment: TaskEnvironment, reporter: CoordinatorReporter
    ) -> None:
        self.environment = environment
        self.reporter = reporter
        self.tasks: dict[TaskKey, Task] = {}
        # How each ended attempt ended ("finished", "failed" or "canceled"),
        # so that a late or repeated DeployTask cannot run it a second time.
        # NOTE: never pruned; it grows by one key per ended attempt.
        self.ended: dict[TaskKey, str] = {}
        # Deployments run one at a time, so that two calls for the same
        # attempt cannot both start it.
        self._deploying = asyncio.Lock()

    async def deploy(
        self, descriptor: fpb.TaskDeploymentDescriptor
    ) -> DeployRejection | None:
        """Start one attempt; return None, or why it cannot run.

        Deploying an attempt that runs or finished already does nothing; one
        that failed or was canceled is not run again. A newer attempt of the
        same subtask cancels the older one first.
        """
        key = TaskKey(
            descriptor.job_graph_job_id,
            descriptor.job_vertex_id,
            descriptor.subtask_index,
            descriptor.attempt,
        )
        async with self._deploying:
            return await self._deploy(key, descriptor)

    async def _deploy(
        self, key: TaskKey, descriptor: fpb.TaskDeploymentDescriptor
    ) -> DeployRejection | None:
        self.reap()
        outcome = self.ended.get(key)
        if key in self.tasks or outcome == "finished":
            logger.debug("task %s is deployed already", key)
            return None
        if outcome is not None:
            return DeployRejection(
                f"attempt {key.attempt} of task {key.task_id} was {outcome} "
                "here already; deploy a newer attempt"
            )
        newer = [k.attempt for k in self._attempts_of(key) if k.attempt > key.attempt]
        if newer:
            return DeployRejection(
                f"attempt {key.attempt} is stale: attempt {max(newer)} runs here"
            )
        for older in self._attempts_of(key):
            await self.cancel(older)
        # Channels that senders of older attempts opened can never be read.
        self.environment.channels.drop(
            key.job_id, key.vertex_id, key.subtask_index, range(key.attempt)
        )
        try:
            task = build_task(descriptor, self.environment)
        except DescriptorError as exc:
            logger.warning("deployment of task %s rejected: %s", key, exc)
            self._forget_channels(key)
            return DeployRejection(str(exc), not isinstance(exc, TaskConfigError))
        except Exception as exc:
            # User code runs while a task is built (an operator's constructor,
            # a restore), so anything it raises must still be a reply. It may
            # depend on outside state, so a new attempt may succeed.
            logger.exception("building task %s failed", key)
            self._forget_channels(key)
            return DeployRejection(f"building task {key} failed: {exc!r}")
        self.tasks[key] = task
        task.start()
        logger.info("task %s deployed", key)
        return None

    def _attempts_of(self, key: TaskKey) -> list[TaskKey]:
        """Return the other attempts of the same subtask, running or ended."""
        return [
            other
            for other in [*self.tasks, *self.ended]
            if (other.job_id, other.vertex_id, other.subtask_index)
            == (key.job_id, key.vertex_id, key.subtask_index)
            and other != key
        ]

    async def cancel(self, key: TaskKey) -> bool:
        """Cancel one attempt; return False when it does not run here."""
        task = self.tasks.pop(key, None)
        if task is None:
            return False
        await task.cancel()
        self.ended[key] = "canceled"
        self._forget_channels(key)
        return True

    def reap(self) -> None:
        """Move ended attempts out of the running set."""
        for key, task in list(self.tasks.items()):
            if task.done:
                del self.tasks[key]
                self.ended[key] = "finished" if task.finished else "failed"
                self._forget_channels(key)

    def _forget_channels(self, key: TaskKey) -> None:
        self.environment.channels.drop(
            key.job_id,
            key.vertex_id,
            key.subtask_index,
            range(key.attempt, key.attempt + 1),
        )

    def of_job(self, job_id: str) -> list[Task]:
        self.reap()
        return [t for k, t in self.tasks.items() if k.job_id == job_id]

    def trigger(
        self, request: fpb.TriggerCheckpointRequest, trace_options: bytes = b""
    ) -> bool:
        """Inject a barrier into every source of the job; False if none runs."""
        triggered = [
            task.trigger_checkpoint(
                request.checkpoint_id, request.checkpoint_timestamp, trace_options
            )
            for task in self.of_job(request.job_id)
        ]
        return any(triggered)

    def running_report(
        self,
    ) -> tuple[list[fpb.TaskMetricData], list[types_pb.RunningTask]]:
        """Return the metrics and identities of the running attempts."""
        self.reap()
        metrics, running = [], []
        for key, task in sorted(self.tasks.items(), key=lambda item: str(item[0])):
            metrics.append(
                fpb.TaskMetricData(
                    task_id=key.task_id,
                    records_in=task.records_in,
                    records_out=task.writer.records_out,
                    job_id=key.job_id,
                )
            )
            running.append(
                types_pb.RunningTask(
                    job_id=key.job_id,
                    job_vertex_id=key.vertex_id,
                    subtask_index=key.subtask_index,
                    attempt=key.attempt,
                )
            )
        return metrics, running

    async def stop(self) -> None:
        """Cancel every attempt. Safe to call twice."""
        for key in list(self.tasks):
            await self.cancel(key)
