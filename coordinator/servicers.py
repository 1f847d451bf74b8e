"""The coordinator's gRPC servicers.

Each RPC builds a command and runs it through the engine. Expected
rejections answer one gRPC status each and write nothing; a standby answers
UNAVAILABLE with the leader's address in the ``jobledger-leader`` trailing
metadata entry; anything unexpected is logged and answers INTERNAL.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from coordinator import checkpoints, jobs, reconcile, taskmanagers
from coordinator.checkpoints import AckOutcome
from coordinator.engine import Engine
from coordinator.errors import CommandRejected, InvalidArgument, NotLeader
from coordinator.ids import split_task_id, task_id
from eventlog import EventLog, now_ms
from observability import spans
from observability.setup import UNTRACED_METHODS
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc

logger = logging.getLogger(__name__)

LEADER_METADATA_KEY = "jobledger-leader"

Request = TypeVar("Request")
Reply = TypeVar("Reply")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Reply]]


# Full gRPC service names by servicer class name.
_service_names = {
    service.name: service.full_name
    for descriptor in (fpb.DESCRIPTOR, svc.DESCRIPTOR)
    for service in descriptor.services_by_name.values()
}


def rpc(method: Handler[Request, Reply]) -> Handler[Request, Reply]:
    """Map the engine's errors of one RPC to gRPC statuses, and trace it.

    NOTE: the coordinator records its RPC spans here, as the cheap
    ``RpcSpan``s of observability.rpcspans, not with the gRPC
    instrumentation's server interceptor and SDK spans, which cut
    AcknowledgeCheckpoint throughput by about a quarter (see BENCHMARKS.md).
    Workers still use the instrumentation.
    """
    name = method.__name__
    # The service of the servicer class that defines the method, by its
    # full gRPC name, so that span names match the clients' spans
    # ("/FlinkDotNet.Proto.TaskManagerRegistration/...").
    servicer_class = method.__qualname__.partition(".")[0]
    service = _service_names.get(servicer_class, servicer_class)

    async def answer(
        self: Any, request: Request, context: grpc.aio.ServicerContext
    ) -> Reply:
        try:
            logger.debug("%s: %s", method.__name__, type(request).__name__)
            return await method(self, request, context)
        except CommandRejected as exc:
            await context.abort(exc.code, exc.message)
        except NotLeader as exc:
            context.set_trailing_metadata(((LEADER_METADATA_KEY, exc.leader_address),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:
            logger.exception("%s failed", method.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"{method.__name__} failed on the coordinator; see its log",
            )
        raise AssertionError("context.abort returned")

    if name in UNTRACED_METHODS:
        return functools.wraps(method)(answer)
    handle = spans.traced_rpc(spans.RpcRoute(service, name), answer)
    return functools.wraps(method)(handle)


def _task_of(vertex_id: str, subtask_index: int) -> str:
    if not vertex_id:
        raise InvalidArgument("job_vertex_id is empty; name the task's vertex")
    if subtask_index < 0:
        raise InvalidArgument(f"subtask_index {subtask_index} is negative")
    return task_id(vertex_id, subtask_index)


def _annotated_task(
    annotation: dict[str, str | int],
    task_of: Callable[..., str],
    *fields: str | int,
) -> str:
    """Return ``task_of(*fields)``, the task of an acknowledgement.

    Adds ``annotation`` and the task to the RPC's span, or ``annotation``
    alone when ``task_of`` raises InvalidArgument: the span of a rejected
    call still names its job and checkpoint.
    """
    try:
        task = task_of(*fields)
    except InvalidArgument:
        spans.annotate_rpc(annotation)
        raise
    annotation[spans.TASK] = task
    spans.annotate_rpc(annotation)
    return task


def _parse_task(operator_instance_id: str) -> str:
    try:
        vertex, index = split_task_id(operator_instance_id)
    except ValueError as exc:
        raise InvalidArgument(f"operator_instance_id: {exc}") from exc
    return task_id(vertex, index)


class JobManagerInternalService(fpb_grpc.JobManagerInternalServiceServicer):
    """Job submission, checkpoint reports and recovery."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @rpc
    async def SubmitJob(
        self, request: fpb.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> fpb.SubmitJobReply:
        if not request.HasField("job_graph"):
            raise InvalidArgument("job_graph is missing; send the JobGraph to run")
        job_id = await self._engine.execute(jobs.decide_submit, request.job_graph)
        spans.annotate_rpc(
            {spans.JOB: job_id, "jobledger.vertices": len(request.job_graph.vertices)}
        )
        logger.info("job %s (%s) submitted", job_id, request.job_graph.job_name)
        return fpb.SubmitJobReply(
            success=True, job_id=job_id, message=f"job {job_id} submitted"
        )

    @rpc
    async def ReportStateCompletion(
        self,
        request: fpb.ReportStateCompletionRequest,
        context: grpc.aio.ServicerContext,
    ) -> fpb.ReportStateCompletionReply:
        task_id = _annotated_task(
            {spans.CHECKPOINT: request.checkpoint_id},
            _parse_task,
            request.operator_instance_id,
        )
        ack = pb.TaskAcknowledgement(
            task_id=task_id,
            snapshot_handle=request.state_location,
            source_offsets=request.input_offsets,
        )
        outcome = await self._engine.execute(
            checkpoints.decide_acknowledge, "", request.checkpoint_id, ack
        )
        spans.annotate_rpc({spans.ACKNOWLEDGEMENT: outcome.value})
        return fpb.ReportStateCompletionReply(ack=outcome != AckOutcome.LATE)

    @rpc
    async def RequestCheckpoint(
        self, request: fpb.RequestCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> fpb.RequestCheckpointReply:
        ids = await self._engine.execute(checkpoints.decide_request, request.job_id)
        return fpb.RequestCheckpointReply(accepted=bool(ids), checkpoint_ids=ids)

    @rpc
    async def RequestRecovery(
        self, request: fpb.RequestRecoveryRequest, context: grpc.aio.ServicerContext
    ) -> fpb.RequestRecoveryReply:
        restored = await self._engine.execute(
            jobs.decide_recovery, request.job_id, request.checkpoint_id
        )
        logger.info(
            "job %s recovering from checkpoint %d by request", request.job_id, restored
        )
        return fpb.RequestRecoveryReply(recovery_initiated=True, checkpoint_id=restored)

    @rpc
    async def ReportFailedCheckpoint(
        self,
        request: fpb.ReportFailedCheckpointRequest,
        context: grpc.aio.ServicerContext,
    ) -> fpb.ReportFailedCheckpointResponse:
        tid = _task_of(request.job_vertex_id, request.subtask_index)
        await self._engine.execute(
            checkpoints.decide_decline,
            request.job_id,
            request.checkpoint_id,
            tid,
            request.failure_reason,
        )
        return fpb.ReportFailedCheckpointResponse(acknowledged=True)

    @rpc
    async def ReportTaskStartupFailure(
        self,
        request: fpb.ReportTaskStartupFailureRequest,
        context: grpc.aio.ServicerContext,
    ) -> fpb.ReportTaskStartupFailureResponse:
        tid = _task_of(request.job_vertex_id, request.subtask_index)
        # A sender that predates the unrecoverable field leaves it false, which
        # keeps the restart behaviour of Flink.NET.
        recorded = await self._engine.execute(
            jobs.decide_startup_failure,
            request.job_id,
            tid,
            request.attempt,
            f"startup failed on {request.task_manager_id or 'a task manager'}: "
            f"{request.failure_reason or 'no reason given'}",
            not request.unrecoverable,
        )
        return fpb.ReportTaskStartupFailureResponse(acknowledged=recorded)

    @rpc
    async def Heartbeat(
        self,
        request: fpb.JobManagerHeartbeatRequest,
        context: grpc.aio.ServicerContext,
    ) -> fpb.JobManagerHeartbeatReply:
        tid = _parse_task(request.operator_instance_id)
        await self._engine.execute(
            jobs.decide_task_health, request.job_id, tid, request.health_status
        )
        return fpb.JobManagerHeartbeatReply(ack=True)


class TaskManagerRegistration(fpb_grpc.TaskManagerRegistrationServicer):
    """Worker membership and checkpoint acknowledgements."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @rpc
    async def RegisterTaskManager(
        self,
        request: fpb.RegisterTaskManagerRequest,
        context: grpc.aio.ServicerContext,
    ) -> fpb.RegisterTaskManagerResponse:
        await self._engine.execute(taskmanagers.decide_register, request)
        logger.info(
            "task manager %s registered at %s:%d (incarnation %d)",
            request.task_manager_id,
            request.address,
            request.port,
            request.incarnation,
        )
        return fpb.RegisterTaskManagerResponse(
            success=True,
            job_manager_id=self._engine.coordinator_id,
            leader_epoch=self._engine.epoch,
        )

    @rpc
    async def SendHeartbeat(
        self, request: fpb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> fpb.HeartbeatResponse:
        if not request.task_manager_id:
            raise InvalidArgument("task_manager_id is empty")
        known = await self._engine.execute(
            reconcile.decide_heartbeat,
            request.task_manager_id,
            request.incarnation,
            list(request.task_metrics),
            list(request.running_tasks),
        )
        if known:
            self._engine.record_running(
                request.task_manager_id,
                reconcile.reported_attempts(request.running_tasks),
            )
        return fpb.HeartbeatResponse(
            acknowledged=known, leader_epoch=self._engine.epoch
        )

    @rpc
    async def AcknowledgeCheckpoint(
        self,
        request: fpb.AcknowledgeCheckpointRequest,
        context: grpc.aio.ServicerContext,
    ) -> fpb.AcknowledgeCheckpointResponse:
        task_id = _annotated_task(
            {spans.JOB: request.job_id, spans.CHECKPOINT: request.checkpoint_id},
            _task_of,
            request.job_vertex_id,
            request.subtask_index,
        )
        ack = pb.TaskAcknowledgement(
            task_id=task_id,
            task_manager_id=request.task_manager_id,
            snapshot_handle=request.snapshot_handle,
            source_offsets=request.source_offsets,
            snapshot_size=request.snapshot_size,
            duration_ms=request.duration,
        )
        outcome = await self._engine.execute(
            checkpoints.decide_acknowledge, request.job_id, request.checkpoint_id, ack
        )
        spans.annotate_rpc({spans.ACKNOWLEDGEMENT: outcome.value})
        return fpb.AcknowledgeCheckpointResponse(success=outcome != AckOutcome.LATE)


class TaskReporting(svc_grpc.TaskReportingServicer):
    """Task lifecycle reports from workers."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @rpc
    async def UpdateTaskStatus(
        self, request: svc.UpdateTaskStatusRequest, context: grpc.aio.ServicerContext
    ) -> svc.UpdateTaskStatusResponse:
        tid = _task_of(request.job_vertex_id, request.subtask_index)
        recorded = await self._engine.execute(
            jobs.decide_task_status,
            request.job_id,
            tid,
            request.attempt,
            request.status,
            request.reason,
        )
        return svc.UpdateTaskStatusResponse(acknowledged=recorded)


class AdminService(svc_grpc.AdminServiceServicer):
    """Queries and operator actions."""

    def __init__(self, engine: Engine, log: EventLog) -> None:
        self._engine = engine
        self._log = log

    def _state(self) -> pb.CoordinatorState:
        if not self._engine.is_leader:
            raise NotLeader(self._engine.leader_address)
        return self._engine.state

    @rpc
    async def ListJobs(
        self, request: svc.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> svc.ListJobsResponse:
        state = self._state()
        ordered = sorted(state.jobs.values(), key=lambda j: j.submitted_ms)
        reply = svc.ListJobsResponse(jobs=[_summary(job) for job in ordered])
        await self._engine.wait_settled()
        return reply

    @rpc
    async def GetJob(
        self, request: svc.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.JobState:
        job = pb.JobState()
        job.CopyFrom(jobs.get_job(self._state(), request.job_id))
        await self._engine.wait_settled()
        return job

    @rpc
    async def CancelJob(
        self, request: svc.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> svc.CancelJobResponse:
        status = await self._engine.execute(jobs.decide_cancel, request.job_id)
        logger.info("job %s cancelled by request", request.job_id)
        return svc.CancelJobResponse(status=status)

    @rpc
    async def ListTaskManagers(
        self, request: svc.ListTaskManagersRequest, context: grpc.aio.ServicerContext
    ) -> svc.ListTaskManagersResponse:
        state = self._state()
        free = jobs.slots_free(state)
        reply = svc.ListTaskManagersResponse(
            task_managers=[
                svc.TaskManagerSummary(task_manager=tm, slots_free=free.get(tm_id, 0))
                for tm_id, tm in sorted(state.task_managers.items())
            ]
        )
        await self._engine.wait_settled()
        return reply

    @rpc
    async def ListCheckpoints(
        self, request: svc.ListCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> svc.ListCheckpointsResponse:
        state = self._state()
        jobs.get_job(state, request.job_id)
        ordered = sorted(
            (c for c in state.checkpoints.values() if c.job_id == request.job_id),
            key=lambda c: c.checkpoint_id,
        )
        reply = svc.ListCheckpointsResponse(
            checkpoints=[_checkpoint_summary(c) for c in ordered]
        )
        await self._engine.wait_settled()
        return reply

    @rpc
    async def GetOverview(
        self, request: svc.GetOverviewRequest, context: grpc.aio.ServicerContext
    ) -> svc.Overview:
        # The first call raises NotLeader before the standbys are read. The
        # state is read after them, since it may change while they are read.
        self._state()
        standbys = await self._live_standbys()
        state = self._state()
        alive = [
            tm
            for tm in state.task_managers.values()
            if tm.status == pb.TASK_MANAGER_ALIVE
        ]
        statuses = [job.status for job in state.jobs.values()]
        reply = svc.Overview(
            standbys=standbys,
            coordinator_id=self._engine.coordinator_id,
            leader_id=state.leader_id,
            leader_address=state.leader_address,
            epoch=state.epoch,
            applied_seq=state.applied_seq,
            task_managers=len(alive),
            slots_total=sum(tm.slots for tm in alive),
            slots_free=sum(max(0, n) for n in jobs.slots_free(state).values()),
            jobs_running=statuses.count(pb.JOB_RUNNING)
            + statuses.count(pb.JOB_RESTARTING),
            jobs_finished=statuses.count(pb.JOB_FINISHED),
            jobs_canceled=statuses.count(pb.JOB_CANCELED),
            jobs_failed=statuses.count(pb.JOB_FAILED),
            jobs_pending=statuses.count(pb.JOB_CREATED),
        )
        await self._engine.wait_settled()
        return reply

    async def _live_standbys(self) -> list[svc.StandbyStatus]:
        """Return the standbys that reported within three lease periods."""
        oldest_ms = now_ms() - int(3 * self._engine.config.lease_s * 1000)
        return [
            svc.StandbyStatus(
                coordinator_id=info.coordinator_id,
                address=info.address,
                followed_seq=info.followed_seq,
            )
            for info in await self._log.standbys()
            if info.reported_ms >= oldest_ms
            and info.coordinator_id != self._engine.coordinator_id
        ]

    async def WatchEvents(
        self, request: svc.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Event]:
        if request.from_seq < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"from_seq {request.from_seq} is negative; give 0 or a seq",
            )
        try:
            async for ev in self._log.follow(max(1, request.from_seq)):
                yield ev
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            logger.warning("WatchEvents from seq %d ended: %s", request.from_seq, exc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))


def _summary(job: pb.JobState) -> svc.JobSummary:
    return svc.JobSummary(
        job_id=job.job_id,
        job_name=job.graph.job_name,
        status=job.status,
        submitted_ms=job.submitted_ms,
        tasks=len(job.tasks),
        tasks_running=sum(1 for t in job.tasks.values() if t.status == pb.TASK_RUNNING),
        restarts=job.restarts,
        latest_completed_checkpoint_id=job.latest_completed_checkpoint_id,
    )


def _checkpoint_summary(c: pb.CheckpointState) -> svc.CheckpointSummary:
    return svc.CheckpointSummary(
        checkpoint_id=c.checkpoint_id,
        status=c.status,
        triggered_ms=c.triggered_ms,
        finished_ms=c.finished_ms,
        duration_ms=c.finished_ms - c.triggered_ms if c.finished_ms else 0,
        size=sum(a.snapshot_size for a in c.acknowledgements.values()),
        acknowledged_tasks=len(c.acknowledgements),
        total_tasks=len(c.tasks_to_acknowledge),
        failure=c.failure,
        failure_message=c.failure_message,
    )
