"""The gRPC services a worker hosts for the coordinator."""

from __future__ import annotations

import logging

import grpc

import observability
from observability import spans
from observability.propagation import to_barrier_options
from protos import jobledger_services_pb2 as svc
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc
from worker.runtime import Runtime
from worker.task import TaskKey

logger = logging.getLogger(__name__)


class TaskExecution(fpb_grpc.TaskExecutionServicer):
    """DeployTask: start one subtask attempt."""

    def __init__(self, runtime: Runtime, task_manager_id: str) -> None:
        self._runtime = runtime
        self._task_manager_id = task_manager_id

    async def DeployTask(
        self, request: fpb.TaskDeploymentDescriptor, context: grpc.aio.ServicerContext
    ) -> fpb.DeployTaskResponse:
        rejection = await self._runtime.deploy(request)
        if rejection is None:
            return fpb.DeployTaskResponse(success=True, message="deployed")
        failure = fpb.ReportTaskStartupFailureRequest(
            job_id=request.job_graph_job_id,
            job_vertex_id=request.job_vertex_id,
            subtask_index=request.subtask_index,
            task_manager_id=self._task_manager_id,
            failure_reason=rejection.reason,
            attempt=request.attempt,
            unrecoverable=not rejection.recoverable,
        )
        # The report goes first, so the coordinator records the failure with its
        # classification before the reply below marks the attempt failed.
        # NOTE: when the report is lost, the coordinator receives only the failed
        # reply and restarts the job; the next attempt's report then fails it.
        await self._runtime.reporter.startup_failure(failure)
        return fpb.DeployTaskResponse(success=False, message=rejection.reason)


class TaskManagerCheckpointing(fpb_grpc.TaskManagerCheckpointingServicer):
    """TriggerTaskCheckpoint: make the job's sources inject a barrier."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def TriggerTaskCheckpoint(
        self, request: fpb.TriggerCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> fpb.TriggerCheckpointResponse:
        options = b""
        if observability.tracing_enabled():
            carrier = spans.carrier_for_worker(request.trace_context)
            options = to_barrier_options(carrier)
        triggered = self._runtime.trigger(request, options)
        if not triggered:
            logger.warning(
                "checkpoint %d of job %s: no source of the job runs here",
                request.checkpoint_id,
                request.job_id,
            )
        return fpb.TriggerCheckpointResponse(acknowledged=triggered)


class TaskManagerControl(svc_grpc.TaskManagerControlServicer):
    """Checkpoint notifications, cancellation and snapshot disposal."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def NotifyCheckpointComplete(
        self,
        request: svc.NotifyCheckpointCompleteRequest,
        context: grpc.aio.ServicerContext,
    ) -> svc.NotifyCheckpointCompleteResponse:
        logger.debug(
            "checkpoint %d of job %s completed", request.checkpoint_id, request.job_id
        )
        for task in self._runtime.of_job(request.job_id):
            task.notify_checkpoint_complete(request.checkpoint_id)
        return svc.NotifyCheckpointCompleteResponse()

    async def NotifyCheckpointAborted(
        self,
        request: svc.NotifyCheckpointAbortedRequest,
        context: grpc.aio.ServicerContext,
    ) -> svc.NotifyCheckpointAbortedResponse:
        for task in self._runtime.of_job(request.job_id):
            task.notify_checkpoint_aborted(request.checkpoint_id)
        return svc.NotifyCheckpointAbortedResponse()

    async def CancelTask(
        self, request: svc.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> svc.CancelTaskResponse:
        key = TaskKey(
            request.job_id,
            request.job_vertex_id,
            request.subtask_index,
            request.attempt,
        )
        canceled = await self._runtime.cancel(key)
        return svc.CancelTaskResponse(canceled=canceled)

    async def DiscardSnapshots(
        self,
        request: svc.DiscardSnapshotsRequest,
        context: grpc.aio.ServicerContext,
    ) -> svc.DiscardSnapshotsResponse:
        store = self._runtime.environment.snapshots
        discarded = store.discard(list(request.snapshot_handles))
        return svc.DiscardSnapshotsResponse(discarded=discarded)
