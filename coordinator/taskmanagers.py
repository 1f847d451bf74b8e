"""Task managers: registration, heartbeats and loss.

A worker's ``incarnation`` grows with every start of its process, so a
delayed registration of an earlier process is recognised as stale and
rejected. Each accepted registration gets a coordinator-assigned
``registration_id``; heartbeat deadlines run from the current
registration, so a timeout that belongs to an older registration of the
same id has no effect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from coordinator.decision import Context, Decision, event
from coordinator.errors import FailedPrecondition, InvalidArgument
from coordinator.jobs import PLACED_TASK, TERMINAL_JOB
from protos import jobledger_events_pb2 as pb
from protos import jobmanager_internal_pb2 as fpb

logger = logging.getLogger(__name__)

MAX_SLOTS = 1024


# ------------------------------------------------------------------ apply


def _apply_registered(
    state: pb.CoordinatorState, body: pb.TaskManagerRegistered, event: pb.Event
) -> None:
    now = event.timestamp.ToMilliseconds()
    tm = state.task_managers[body.task_manager_id]
    tm.task_manager_id = body.task_manager_id
    tm.address = body.address
    tm.port = body.port
    tm.slots = body.slots
    tm.incarnation = body.incarnation
    tm.registration_id = body.registration_id
    tm.registered_ms = now
    tm.last_heartbeat_ms = now
    tm.status = pb.TASK_MANAGER_ALIVE
    tm.lost_reason = ""
    state.last_registration_id = max(state.last_registration_id, body.registration_id)


def _apply_heartbeat(
    state: pb.CoordinatorState, body: pb.TaskManagerHeartbeat, event: pb.Event
) -> None:
    tm = state.task_managers[body.task_manager_id]
    if tm.registration_id != body.registration_id:
        raise ValueError(
            f"heartbeat of registration {body.registration_id}, but task manager "
            f"{body.task_manager_id} is at registration {tm.registration_id}"
        )
    tm.last_heartbeat_ms = event.timestamp.ToMilliseconds()
    for metric in body.task_metrics:
        job = state.jobs.get(metric.job_id)
        task = job.tasks.get(metric.task_id) if job is not None else None
        if task is not None and task.task_manager_id == body.task_manager_id:
            task.records_in = metric.records_in
            task.records_out = metric.records_out


def _apply_lost(
    state: pb.CoordinatorState, body: pb.TaskManagerLost, event: pb.Event
) -> None:
    tm = state.task_managers[body.task_manager_id]
    if tm.registration_id != body.registration_id:
        raise ValueError(
            f"loss of registration {body.registration_id}, but task manager "
            f"{body.task_manager_id} is at registration {tm.registration_id}"
        )
    tm.status = pb.TASK_MANAGER_LOST
    tm.lost_reason = body.reason


APPLIERS: dict[str, Callable[..., None]] = {
    "task_manager_registered": _apply_registered,
    "task_manager_heartbeat": _apply_heartbeat,
    "task_manager_lost": _apply_lost,
}


# ------------------------------------------------------------------ decide


def _validate_registration(request: fpb.RegisterTaskManagerRequest) -> None:
    if not request.task_manager_id:
        raise InvalidArgument("task_manager_id is empty; give the worker an id")
    if not request.address:
        raise InvalidArgument(
            f"address of task manager {request.task_manager_id} is empty; "
            "give the host its TaskExecution service listens on"
        )
    if not 1 <= request.port <= 65535:
        raise InvalidArgument(
            f"port {request.port} of task manager {request.task_manager_id} is "
            "invalid; give the port its TaskExecution service listens on"
        )
    if not 0 <= request.slots <= MAX_SLOTS:
        raise InvalidArgument(
            f"slots {request.slots} of task manager {request.task_manager_id} is "
            f"invalid; give 1 to {MAX_SLOTS}, or 0 for the coordinator's default"
        )
    if request.incarnation < 0:
        raise InvalidArgument(
            f"incarnation {request.incarnation} of task manager "
            f"{request.task_manager_id} is negative"
        )


def decide_register(ctx: Context, request: fpb.RegisterTaskManagerRequest) -> Decision:
    """Record a worker's registration, replacing an older one of the same id.

    A registration from a newer process (or of unknown incarnation) ends the
    old one: its tasks fail and their jobs fail over. The same process
    registering again keeps its tasks. Raises FailedPrecondition for a
    delayed registration of an older process.
    """
    _validate_registration(request)
    tm_id = request.task_manager_id
    current = ctx.state.task_managers.get(tm_id)
    events: list[pb.Event] = []
    # A lost registration still records the newest incarnation seen, so a
    # delayed registration of an older process stays stale after the loss.
    if current is not None and 0 < request.incarnation < current.incarnation:
        raise FailedPrecondition(
            f"registration of task manager {tm_id} incarnation "
            f"{request.incarnation} is stale: incarnation {current.incarnation} "
            "registered since"
        )
    if (
        current is not None
        and current.status == pb.TASK_MANAGER_ALIVE
        and (request.incarnation == 0 or request.incarnation != current.incarnation)
    ):
        events += lost_events(ctx.state, current, "a new process registered")
    registered = pb.TaskManagerRegistered(
        task_manager_id=tm_id,
        address=request.address,
        port=request.port,
        slots=request.slots or ctx.config.default_slots,
        incarnation=request.incarnation,
        registration_id=ctx.state.last_registration_id + 1,
    )
    events.append(event(task_manager_registered=registered))
    return Decision(events, reply=True)


def decide_heartbeat(
    ctx: Context,
    tm_id: str,
    incarnation: int,
    metrics: list[fpb.TaskMetricData],
) -> Decision:
    """Record a heartbeat; the reply is False for a worker that must register."""
    tm = ctx.state.task_managers.get(tm_id)
    if tm is None or tm.status != pb.TASK_MANAGER_ALIVE:
        return Decision(reply=False)
    if incarnation and incarnation != tm.incarnation:
        return Decision(reply=False)
    heartbeat = pb.TaskManagerHeartbeat(
        task_manager_id=tm_id, registration_id=tm.registration_id, task_metrics=metrics
    )
    return Decision([event(task_manager_heartbeat=heartbeat)], reply=True)


def heartbeat_deadline_ms(
    ctx: Context, tm: pb.TaskManagerState, leader_since_ms: int
) -> int:
    """Return when a silent worker is declared lost.

    The silence counts from the later of its last heartbeat and the time
    this leader took over, so no worker is lost for a silence that began
    before the takeover.
    """
    timeout_ms = int(ctx.config.heartbeat_timeout_s * 1000)
    return max(tm.last_heartbeat_ms, leader_since_ms) + timeout_ms


def decide_check_heartbeats(ctx: Context, leader_since_ms: int) -> Decision:
    """Declare lost every live worker silent past its heartbeat deadline."""
    events: list[pb.Event] = []
    for tm in sorted(ctx.state.task_managers.values(), key=lambda t: t.task_manager_id):
        if tm.status != pb.TASK_MANAGER_ALIVE:
            continue
        if ctx.now_ms <= heartbeat_deadline_ms(ctx, tm, leader_since_ms):
            continue
        reason = (
            f"no heartbeat for {ctx.config.heartbeat_timeout_s:g} s (heartbeat timeout)"
        )
        logger.warning(
            "task manager %s (registration %d) lost: %s",
            tm.task_manager_id,
            tm.registration_id,
            reason,
        )
        events += lost_events(ctx.state, tm, reason)
    return Decision(events)


def decide_unreachable(
    ctx: Context, tm_id: str, registration_id: int, call: str, error: str
) -> Decision:
    """Declare a worker lost because a call to its registration found no server.

    This ends the registration as a heartbeat timeout would: its tasks fail,
    its slots are no longer offered and its jobs fail over. Only the
    registration the call was decided for is affected, so a call that fails
    after the worker registered again (or after it was lost) changes nothing.
    """
    tm = ctx.state.task_managers.get(tm_id)
    if (
        tm is None
        or tm.status != pb.TASK_MANAGER_ALIVE
        or tm.registration_id != registration_id
    ):
        return Decision()
    reason = (
        f"task manager {tm_id} at {tm.address}:{tm.port} is unreachable: "
        f"{call} failed with {error}"
    )
    logger.warning(
        "task manager %s (registration %d) lost: %s", tm_id, registration_id, reason
    )
    return Decision(lost_events(ctx.state, tm, reason))


def lost_events(
    state: pb.CoordinatorState, tm: pb.TaskManagerState, reason: str
) -> list[pb.Event]:
    """Decide the loss of a worker's registration and the failure of its tasks."""
    events = [
        event(
            task_manager_lost=pb.TaskManagerLost(
                task_manager_id=tm.task_manager_id,
                registration_id=tm.registration_id,
                reason=reason,
            )
        )
    ]
    for job in state.jobs.values():
        if job.status in TERMINAL_JOB:
            continue
        for tid, task in sorted(job.tasks.items()):
            if (
                task.task_manager_id == tm.task_manager_id
                and task.status in PLACED_TASK
            ):
                changed = pb.TaskStatusChanged(
                    job_id=job.job_id,
                    task_id=tid,
                    attempt=task.attempt,
                    status=pb.TASK_FAILED,
                    reason=f"task manager {tm.task_manager_id} lost: {reason}",
                )
                events.append(event(task_status_changed=changed))
    return events
