"""A stand-in coordinator for membership tests: a real gRPC server on port 0
that records registrations and heartbeats, or acts as a standby that names
the leader in the ``jobledger-leader`` trailing metadata entry."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from protos import jobledger_services_pb2 as svc
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc


class FakeCoordinator(
    fpb_grpc.TaskManagerRegistrationServicer,
    fpb_grpc.JobManagerInternalServiceServicer,
    svc_grpc.TaskReportingServicer,
):
    """Acts as the leader, or as a standby when ``leader_address`` is set."""

    def __init__(self, epoch: int = 1, leader_address: str = "") -> None:
        self.epoch = epoch
        self.leader_address = leader_address
        self.registrations: list[fpb.RegisterTaskManagerRequest] = []
        self.heartbeats: list[fpb.HeartbeatRequest] = []
        self.rejected_calls = 0
        # Task reports by method name: UpdateTaskStatus, AcknowledgeCheckpoint,
        # ReportFailedCheckpoint, ReportTaskStartupFailure.
        self.reports: list[tuple[str, Any]] = []
        # Heartbeat replies with acknowledged=false before the first true one.
        self.unknown_heartbeats = 0
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def start(self, port: int = 0) -> int:
        server = grpc.aio.server()
        fpb_grpc.add_TaskManagerRegistrationServicer_to_server(self, server)
        fpb_grpc.add_JobManagerInternalServiceServicer_to_server(self, server)
        svc_grpc.add_TaskReportingServicer_to_server(self, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        self._server = server
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    async def _standby(self, context: Any) -> None:
        self.rejected_calls += 1
        context.set_trailing_metadata((("jobledger-leader", self.leader_address),))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "not the leader")

    async def RegisterTaskManager(
        self, request: fpb.RegisterTaskManagerRequest, context: Any
    ) -> fpb.RegisterTaskManagerResponse:
        if self.leader_address:
            await self._standby(context)
        self.registrations.append(request)
        return fpb.RegisterTaskManagerResponse(
            success=True, job_manager_id="fake", leader_epoch=self.epoch
        )

    async def SendHeartbeat(
        self, request: fpb.HeartbeatRequest, context: Any
    ) -> fpb.HeartbeatResponse:
        if self.leader_address:
            await self._standby(context)
        self.heartbeats.append(request)
        if self.unknown_heartbeats > 0:
            self.unknown_heartbeats -= 1
            return fpb.HeartbeatResponse(acknowledged=False)
        return fpb.HeartbeatResponse(acknowledged=True)

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await asyncio.sleep(0.01)

    def of(self, method: str) -> list[Any]:
        """Return the requests of every recorded report of ``method``."""
        return [request for name, request in self.reports if name == method]

    async def wait_report(self, method: str, count: int = 1) -> list[Any]:
        await self.wait_for(lambda f: len(f.of(method)) >= count)
        return self.of(method)

    async def UpdateTaskStatus(
        self, request: svc.UpdateTaskStatusRequest, context: Any
    ) -> svc.UpdateTaskStatusResponse:
        self.reports.append(("UpdateTaskStatus", request))
        return svc.UpdateTaskStatusResponse(acknowledged=True)

    async def AcknowledgeCheckpoint(
        self, request: fpb.AcknowledgeCheckpointRequest, context: Any
    ) -> fpb.AcknowledgeCheckpointResponse:
        self.reports.append(("AcknowledgeCheckpoint", request))
        return fpb.AcknowledgeCheckpointResponse(success=True)

    async def ReportFailedCheckpoint(
        self, request: fpb.ReportFailedCheckpointRequest, context: Any
    ) -> fpb.ReportFailedCheckpointResponse:
        self.reports.append(("ReportFailedCheckpoint", request))
        return fpb.ReportFailedCheckpointResponse(acknowledged=True)

    async def ReportTaskStartupFailure(
        self, request: fpb.ReportTaskStartupFailureRequest, context: Any
    ) -> fpb.ReportTaskStartupFailureResponse:
        self.reports.append(("ReportTaskStartupFailure", request))
        return fpb.ReportTaskStartupFailureResponse(acknowledged=True)
