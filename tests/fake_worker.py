"""A stand-in task manager for coordinator tests: a real gRPC server on port 0
that records every call the coordinator makes and answers as configured."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from protos import jobledger_services_pb2 as svc
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc

EPOCH_KEY = "jobledger-leader-epoch"


@dataclasses.dataclass
class Call:
    """One recorded call: the method, the request and the epoch it carried."""

    method: str
    request: Any
    epoch: int


class FakeWorker(
    fpb_grpc.TaskExecutionServicer,
    fpb_grpc.TaskManagerCheckpointingServicer,
    svc_grpc.TaskManagerControlServicer,
):
    """Records calls; ``deploy_ok`` and ``trigger_delay_s`` shape the answers.

    Attempts listed in ``startup_failure_attempts`` fail to deploy as a real
    worker's do: ``report_startup_failure`` (when set) gets the report, with
    ``unrecoverable`` as given, before DeployTask replies failure.
    """

    def __init__(self, task_manager_id: str) -> None:
        self.task_manager_id = task_manager_id
        self.calls: list[Call] = []
        self.deploy_ok = True
        self.trigger_delay_s = 0.0
        # False makes TriggerTaskCheckpoint reply that no source runs here.
        self.trigger_accepted = True
        self.startup_failure_attempts: set[int] = set()
        self.unrecoverable = False
        self.report_startup_failure: (
            Callable[[fpb.ReportTaskStartupFailureRequest], Awaitable[Any]] | None
        ) = None
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._changed = asyncio.Condition()

    async def start(self) -> int:
        server = grpc.aio.server()
        fpb_grpc.add_TaskExecutionServicer_to_server(self, server)
        fpb_grpc.add_TaskManagerCheckpointingServicer_to_server(self, server)
        svc_grpc.add_TaskManagerControlServicer_to_server(self, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    async def _record(self, method: str, request: Any, context: Any) -> None:
        metadata = dict(context.invocation_metadata() or ())
        epoch = int(metadata.get(EPOCH_KEY, 0))
        self.calls.append(Call(method, request, epoch))
        async with self._changed:
            self._changed.notify_all()

    def of(self, method: str) -> list[Any]:
        """Return the requests of every recorded call of ``method``."""
        return [call.request for call in self.calls if call.method == method]

    async def wait_for(
        self, method: str, count: int = 1, timeout: float = 10
    ) -> list[Any]:
        """Wait until ``method`` was called ``count`` times; return the requests."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.of(method)) >= count)
        return self.of(method)

    async def DeployTask(
        self, request: fpb.TaskDeploymentDescriptor, context: Any
    ) -> fpb.DeployTaskResponse:
        await self._record("DeployTask", request, context)
        if request.attempt in self.startup_failure_attempts:
            return await self._fail_startup(request)
        if self.deploy_ok:
            return fpb.DeployTaskResponse(success=True)
        return fpb.DeployTaskResponse(success=False, message="operator not found")

    async def _fail_startup(
        self, request: fpb.TaskDeploymentDescriptor
    ) -> fpb.DeployTaskResponse:
        reason = f"cannot start {request.fully_qualified_operator_name}"
        if self.report_startup_failure is not None:
            await self.report_startup_failure(
                fpb.ReportTaskStartupFailureRequest(
                    job_id=request.job_graph_job_id,
                    job_vertex_id=request.job_vertex_id,
                    subtask_index=request.subtask_index,
                    task_manager_id=self.task_manager_id,
                    failure_reason=reason,
                    attempt=request.attempt,
                    unrecoverable=self.unrecoverable,
                )
            )
        return fpb.DeployTaskResponse(success=False, message=reason)

    async def TriggerTaskCheckpoint(
        self, request: fpb.TriggerCheckpointRequest, context: Any
    ) -> fpb.TriggerCheckpointResponse:
        await self._record("TriggerTaskCheckpoint", request, context)
        if self.trigger_delay_s:
            await asyncio.sleep(self.trigger_delay_s)
        return fpb.TriggerCheckpointResponse(acknowledged=self.trigger_accepted)

    async def NotifyCheckpointComplete(
        self, request: svc.NotifyCheckpointCompleteRequest, context: Any
    ) -> svc.NotifyCheckpointCompleteResponse:
        await self._record("NotifyCheckpointComplete", request, context)
        return svc.NotifyCheckpointCompleteResponse()

    async def NotifyCheckpointAborted(
        self, request: svc.NotifyCheckpointAbortedRequest, context: Any
    ) -> svc.NotifyCheckpointAbortedResponse:
        await self._record("NotifyCheckpointAborted", request, context)
        return svc.NotifyCheckpointAbortedResponse()

    async def CancelTask(
        self, request: svc.CancelTaskRequest, context: Any
    ) -> svc.CancelTaskResponse:
        await self._record("CancelTask", request, context)
        return svc.CancelTaskResponse(canceled=True)

    async def DiscardSnapshots(
        self, request: svc.DiscardSnapshotsRequest, context: Any
    ) -> svc.DiscardSnapshotsResponse:
        await self._record("DiscardSnapshots", request, context)
        return svc.DiscardSnapshotsResponse(discarded=len(request.snapshot_handles))
