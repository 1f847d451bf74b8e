"""Jobs and their tasks: apply functions, decisions and the scheduler.

A job moves CREATED -> RUNNING once every subtask has a slot, RUNNING ->
RESTARTING when a task fails (and back to CREATED when the restart
strategy's delay has passed), and ends FINISHED, CANCELED or FAILED. A
terminal job never leaves its state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from coordinator import graph as graphs
from coordinator.decision import (
    CancelTask,
    Context,
    Decision,
    DeployTask,
    Effect,
    endpoint_of,
    event,
    registration_of,
)
from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound
from coordinator.ids import task_id
from coordinator.restart import next_restart_delay_ms
from observability import spans
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobmanager_internal_pb2 as fpb

logger = logging.getLogger(__name__)

TERMINAL_JOB = frozenset({pb.JOB_FINISHED, pb.JOB_CANCELED, pb.JOB_FAILED})
TERMINAL_TASK = frozenset({pb.TASK_FINISHED, pb.TASK_CANCELED, pb.TASK_FAILED})
# Tasks that hold a slot on their task manager.
PLACED_TASK = frozenset({pb.TASK_DEPLOYING, pb.TASK_RUNNING})


# ------------------------------------------------------------------ apply


def _apply_job_submitted(
    state: pb.CoordinatorState, body: pb.JobSubmitted, event: pb.Event
) -> None:
    if body.job_id in state.jobs:
        raise ValueError(f"job {body.job_id} was already submitted")
    now = event.timestamp.ToMilliseconds()
    job = state.jobs[body.job_id]
    job.job_id = body.job_id
    job.graph.CopyFrom(body.graph)
    job.status = pb.JOB_CREATED
    job.submitted_ms = now
    job.status_changed_ms = now
    for vertex in body.graph.vertices:
        for index in range(vertex.parallelism):
            task = job.tasks[task_id(vertex.id, index)]
            task.job_vertex_id = vertex.id
            task.subtask_index = index
            task.attempt = 1
            task.status = pb.TASK_CREATED
            task.status_changed_ms = now
    state.last_job_number = max(state.last_job_number, body.job_number)


def _apply_tasks_assigned(
    state: pb.CoordinatorState, body: pb.TasksAssigned, event: pb.Event
) -> None:
    job = state.jobs[body.job_id]
    now = event.timestamp.ToMilliseconds()
    for assignment in body.assignments:
        task = job.tasks[assignment.task_id]
        if task.status != pb.TASK_CREATED:
            raise ValueError(f"task {assignment.task_id} is not waiting for a slot")
        task.task_manager_id = assignment.task_manager_id
        task.status = pb.TASK_DEPLOYING
        task.status_changed_ms = now
    _set_job_status(job, pb.JOB_RUNNING, now)


def _apply_task_status_changed(
    state: pb.CoordinatorState, body: pb.TaskStatusChanged, event: pb.Event
) -> None:
    task = state.jobs[body.job_id].tasks[body.task_id]
    if task.attempt != body.attempt:
        raise ValueError(
            f"task {body.task_id} runs attempt {task.attempt}, not {body.attempt}"
        )
    task.status = body.status
    task.failure_reason = body.reason
    task.status_changed_ms = event.timestamp.ToMilliseconds()


def _apply_task_health_reported(
    state: pb.CoordinatorState, body: pb.TaskHealthReported, event: pb.Event
) -> None:
    state.jobs[body.job_id].tasks[body.task_id].health_status = body.health_status


def _apply_job_failing_over(
    state: pb.CoordinatorState, body: pb.JobFailingOver, event: pb.Event
) -> None:
    job = state.jobs[body.job_id]
    now = event.timestamp.ToMilliseconds()
    _set_job_status(job, pb.JOB_RESTARTING, now)
    job.failure_reason = body.reason
    job.last_failure_ms = now
    job.restart_at_ms = body.restart_at_ms
    job.last_restart_delay_ms = body.backoff_ms
    job.restore_checkpoint_id = body.restore_checkpoint_id
    job.failover_attempts += 1
    job.recovery_trace_context.clear()
    job.recovery_trace_context.update(body.trace_context)
    _cancel_tasks(job, now)


def _apply_job_restarted(
    state: pb.CoordinatorState, body: pb.JobRestarted, event: pb.Event
) -> None:
    job = state.jobs[body.job_id]
    now = event.timestamp.ToMilliseconds()
    for task in job.tasks.values():
        task.attempt += 1
        task.status = pb.TASK_CREATED
        task.task_manager_id = ""
        task.health_status = ""
        task.failure_reason = ""
        task.records_in = 0
        task.records_out = 0
        task.status_changed_ms = now
    job.restore_checkpoint_id = body.restore_checkpoint_id
    job.restarts += 1
    job.restart_at_ms = 0
    job.failed_checkpoints_in_row = 0
    _set_job_status(job, pb.JOB_CREATED, now)


def _apply_job_status_changed(
    state: pb.CoordinatorState, body: pb.JobStatusChanged, event: pb.Event
) -> None:
    job = state.jobs[body.job_id]
    if job.status in TERMINAL_JOB:
        raise ValueError(f"job {body.job_id} is already terminal")
    now = event.timestamp.ToMilliseconds()
    _set_job_status(job, body.status, now)
    if body.reason:
        job.failure_reason = body.reason
    if body.status in TERMINAL_JOB:
        job.restart_at_ms = 0
        _cancel_tasks(job, now)


def _set_job_status(job: pb.JobState, status: pb.JobStatus.ValueType, now: int) -> None:
    job.status = status
    job.status_changed_ms = now


def _cancel_tasks(job: pb.JobState, now: int) -> None:
    for task in job.tasks.values():
        if task.status not in TERMINAL_TASK:
            task.status = pb.TASK_CANCELED
            task.status_changed_ms = now


APPLIERS: dict[str, Callable[..., None]] = {
    "job_submitted": _apply_job_submitted,
    "tasks_assigned": _apply_tasks_assigned,
    "task_status_changed": _apply_task_status_changed,
    "task_health_reported": _apply_task_health_reported,
    "job_failing_over": _apply_job_failing_over,
    "job_restarted": _apply_job_restarted,
    "job_status_changed": _apply_job_status_changed,
}


# ------------------------------------------------------------------ queries


def get_job(state: pb.CoordinatorState, job_id: str) -> pb.JobState:
    """Return the job or raise NotFound."""
    if not job_id:
        raise InvalidArgument("job_id is empty; give the id SubmitJob returned")
    job = state.jobs.get(job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found; list jobs with `jobledger jobs`")
    return job


def get_task(job: pb.JobState, tid: str) -> pb.TaskState:
    """Return the task or raise NotFound."""
    task = job.tasks.get(tid)
    if task is None:
        raise NotFound(f"task {tid} is not a task of job {job.job_id}")
    return task


def slots_free(state: pb.CoordinatorState) -> dict[str, int]:
    """Return the free slots of every live task manager.

    A slot is shared by subtask i of every vertex of one job, as with
    Flink's default slot sharing group.
    """
    used: dict[str, set[tuple[str, int]]] = {}
    for job in state.jobs.values():
        if job.status in TERMINAL_JOB:
            continue
        for task in job.tasks.values():
            if task.status in PLACED_TASK:
                used.setdefault(task.task_manager_id, set()).add(
                    (job.job_id, task.subtask_index)
                )
    return {
        tm_id: tm.slots - len(used.get(tm_id, ()))
        for tm_id, tm in state.task_managers.items()
        if tm.status == pb.TASK_MANAGER_ALIVE
    }


def placement(state: pb.CoordinatorState, job: pb.JobState) -> dict[str, str]:
    """Map each placed task of the job to its task manager's "host:port"."""
    return {
        tid: endpoint_of(state, task.task_manager_id)
        for tid, task in job.tasks.items()
        if task.task_manager_id
    }


# ------------------------------------------------------------------ decide


def decide_submit(ctx: Context, graph: fpb.JobGraph) -> Decision:
    """Validate and record a job; the scheduler deploys it when slots allow."""
    graphs.validate(graph, ctx.config.max_parallelism)
    job_id = f"{ctx.rng.getrandbits(128):032x}"
    submitted = pb.JobSubmitted(
        job_id=job_id, graph=graph, job_number=ctx.state.last_job_number + 1
    )
    return Decision([event(job_submitted=submitted)], reply=job_id)


def decide_cancel(ctx: Context, job_id: str) -> Decision:
    """Cancel a job; cancelling a cancelled job again changes nothing."""
    from coordinator import checkpoints

    job = get_job(ctx.state, job_id)
    if job.status == pb.JOB_CANCELED:
        return Decision(reply=job.status)
    if job.status in TERMINAL_JOB:
        raise FailedPrecondition(
            f"job {job_id} is already {pb.JobStatus.Name(job.status)}; "
            "only a job that has not ended can be cancelled"
        )
    events = checkpoints.abort_pending(ctx, job_id, "the job was cancelled")
    events.append(
        event(
            job_status_changed=pb.JobStatusChanged(
                job_id=job_id, status=pb.JOB_CANCELED, reason="cancelled by request"
            )
        )
    )
    return Decision(events, reply=pb.JOB_CANCELED)


def decide_recovery(ctx: Context, job_id: str, checkpoint_id: int) -> Decision:
    """Restart every task of a job from a completed checkpoint (0: the latest)."""
    from coordinator import checkpoints

    job = get_job(ctx.state, job_id)
    if job.status in TERMINAL_JOB:
        raise FailedPrecondition(
            f"job {job_id} is {pb.JobStatus.Name(job.status)}; a job that ended "
            "cannot be recovered"
        )
    restore = checkpoints.restorable(ctx.state, job, checkpoint_id)
    events = checkpoints.abort_pending(ctx, job_id, "the job is being recovered")
    restarted = pb.JobRestarted(
        job_id=job_id, restore_checkpoint_id=restore.checkpoint_id, requested=True
    )
    events.append(event(job_restarted=restarted))
    return Decision(events, reply=restore.checkpoint_id)


def decide_task_status(
    ctx: Context,
    job_id: str,
    tid: str,
    attempt: int,
    status: pb.TaskStatus.ValueType,
    reason: str,
) -> Decision:
    """Record a task's report of RUNNING, FINISHED or FAILED.

    Returns a Decision whose reply is False when the report belongs to an
    older attempt or the task already ended; such reports change nothing.
    """
    if status not in (pb.TASK_RUNNING, pb.TASK_FINISHED, pb.TASK_FAILED):
        known = pb.TaskStatus.DESCRIPTOR.values_by_number.get(status)
        raise InvalidArgument(
            f"task status {known.name if known else status} cannot be reported; "
            "report TASK_RUNNING, TASK_FINISHED or TASK_FAILED"
        )
    job = get_job(ctx.state, job_id)
    task = get_task(job, tid)
    attempt = attempt or task.attempt
    if attempt != task.attempt or task.status not in PLACED_TASK:
        return Decision(reply=False)
    if status == task.status:
        return Decision(reply=True)
    changed = pb.TaskStatusChanged(
        job_id=job_id, task_id=tid, attempt=attempt, status=status, reason=reason
    )
    return Decision([event(task_status_changed=changed)], reply=True)


def decide_startup_failure(
    ctx: Context, job_id: str, tid: str, attempt: int, reason: str, recoverable: bool
) -> Decision:
    """Record that a task could not start, and fail the job when it is unrecoverable.

    An unrecoverable failure comes from the task's configuration, which a
    restart would deploy again unchanged. So the job goes to FAILED at once
    instead of restarting, whatever the restart strategy allows. The reply is
    False, and nothing changes, when the report belongs to an older attempt
    or the task already ended.
    """
    from coordinator import checkpoints

    decision = decide_task_status(ctx, job_id, tid, attempt, pb.TASK_FAILED, reason)
    if recoverable or not decision.events:
        return decision
    job_reason = (
        f"task {tid} failed: {reason}; the failure is not recoverable, "
        "so the job is not restarted"
    )
    logger.warning("job %s fails without a restart: %s", job_id, job_reason)
    events = [*decision.events]
    events += checkpoints.abort_pending(ctx, job_id, f"the job failed: {reason}")
    failed = pb.JobStatusChanged(job_id=job_id, status=pb.JOB_FAILED, reason=job_reason)
    events.append(event(job_status_changed=failed))
    return Decision(events, reply=True)


def decide_task_health(ctx: Context, job_id: str, tid: str, health: str) -> Decision:
    """Record a task's health status; an unchanged status writes nothing."""
    if not health or len(health) > 64:
        raise InvalidArgument(
            f"health_status {health!r} is invalid; send a word such as HEALTHY "
            "or DEGRADED of at most 64 characters"
        )
    job = get_job(ctx.state, job_id)
    task = get_task(job, tid)
    if task.health_status == health:
        return Decision(reply=True)
    reported = pb.TaskHealthReported(job_id=job_id, task_id=tid, health_status=health)
    return Decision([event(task_health_reported=reported)], reply=True)


def decide_deploy_result(
    ctx: Context, job_id: str, tid: str, attempt: int, ok: bool, message: str
) -> Decision:
    """Record how a DeployTask call ended; results of old attempts are ignored."""
    job = ctx.state.jobs.get(job_id)
    task = job.tasks.get(tid) if job is not None else None
    if task is None or task.attempt != attempt or task.status != pb.TASK_DEPLOYING:
        return Decision()
    if ok:
        status, reason = pb.TASK_RUNNING, ""
    else:
        status, reason = pb.TASK_FAILED, f"deployment failed: {message}"
    changed = pb.TaskStatusChanged(
        job_id=job_id, task_id=tid, attempt=attempt, status=status, reason=reason
    )
    return Decision([event(task_status_changed=changed)])


def decide_restart_due(ctx: Context, job_id: str) -> Decision:
    """Redeploy a restarting job once its restart delay has passed."""
    job = ctx.state.jobs.get(job_id)
    if job is None or job.status != pb.JOB_RESTARTING:
        return Decision()
    if ctx.now_ms < job.restart_at_ms:
        return Decision()
    restarted = pb.JobRestarted(
        job_id=job_id, restore_checkpoint_id=job.restore_checkpoint_id
    )
    return Decision([event(job_restarted=restarted)])


def fail_over(ctx: Context, job: pb.JobState, reason: str) -> list[pb.Event]:
    """Decide a job's failover: restart after the strategy's delay, or fail."""
    from coordinator import checkpoints

    events = checkpoints.abort_pending(ctx, job.job_id, f"failover: {reason}")
    delay = next_restart_delay_ms(ctx.config.restart, job, ctx.now_ms, ctx.rng)
    if delay is None:
        failed = pb.JobStatusChanged(
            job_id=job.job_id,
            status=pb.JOB_FAILED,
            reason=f"{reason}; the restart strategy allows no more restarts",
        )
        events.append(event(job_status_changed=failed))
        return events
    jittered, backoff = delay
    failing = pb.JobFailingOver(
        job_id=job.job_id,
        reason=reason,
        restart_delay_ms=jittered,
        restart_at_ms=ctx.now_ms + jittered,
        restore_checkpoint_id=job.latest_completed_checkpoint_id,
        backoff_ms=backoff,
        trace_context=spans.failover_span(
            job.job_id, reason, jittered, job.latest_completed_checkpoint_id
        ),
    )
    events.append(event(job_failing_over=failing))
    return events


# ------------------------------------------------------------------ rules
# Rules run after every decision has been applied, on the jobs its events
# touched, and decide what follows from the new state.


def rule_fail_over(ctx: Context, job_ids: Iterable[str]) -> list[pb.Event]:
    """Fail over running jobs with a failed task or too many failed checkpoints."""
    events: list[pb.Event] = []
    tolerable = ctx.config.checkpoints.tolerable_failed
    for job_id in job_ids:
        job = ctx.state.jobs.get(job_id)
        if job is None or job.status not in (pb.JOB_CREATED, pb.JOB_RUNNING):
            continue
        failed = [t for t in job.tasks.values() if t.status == pb.TASK_FAILED]
        if failed:
            first = min(failed, key=lambda t: (t.job_vertex_id, t.subtask_index))
            tid = task_id(first.job_vertex_id, first.subtask_index)
            events += fail_over(ctx, job, f"task {tid} failed: {first.failure_reason}")
        elif job.failed_checkpoints_in_row > tolerable:
            reason = (
                f"{job.failed_checkpoints_in_row} checkpoints failed in a row, "
                f"more than the {tolerable} tolerated"
            )
            events += fail_over(ctx, job, reason)
    return events


def rule_finish(ctx: Context, job_ids: Iterable[str]) -> list[pb.Event]:
    """Finish running jobs whose tasks have all finished."""
    from coordinator import checkpoints

    events: list[pb.Event] = []
    for job_id in job_ids:
        job = ctx.state.jobs.get(job_id)
        if job is None or job.status != pb.JOB_RUNNING:
            continue
        if all(t.status == pb.TASK_FINISHED for t in job.tasks.values()):
            events += checkpoints.abort_pending(ctx, job_id, "the job finished")
            finished = pb.JobStatusChanged(job_id=job_id, status=pb.JOB_FINISHED)
            events.append(event(job_status_changed=finished))
    return events


def rule_schedule(ctx: Context) -> list[pb.Event]:
    """Give slots to waiting jobs, whole jobs at a time, oldest first."""
    waiting = sorted(
        (
            job
            for job in ctx.state.jobs.values()
            if job.status == pb.JOB_CREATED
            and all(t.status == pb.TASK_CREATED for t in job.tasks.values())
        ),
        key=lambda job: job.submitted_ms,
    )
    if not waiting:
        return []
    free = slots_free(ctx.state)
    events = []
    for job in waiting:
        needed = graphs.slots_needed(job.graph)
        if sum(max(0, n) for n in free.values()) < needed:
            continue
        assigned = pb.TasksAssigned(job_id=job.job_id)
        for shared_slot in range(needed):
            # Spread: each shared slot goes to the task manager with the most
            # free slots; ties go to the smallest id, so replay is stable.
            tm_id = min(free, key=lambda tm: (-free[tm], tm))
            free[tm_id] -= 1
            for tid, task in sorted(job.tasks.items()):
                if task.subtask_index == shared_slot:
                    assigned.assignments.append(
                        pb.TaskAssignment(task_id=tid, task_manager_id=tm_id)
                    )
        events.append(event(tasks_assigned=assigned))
    return events


# ------------------------------------------------------------------ effects


def deploy_effects(
    state: pb.CoordinatorState, job: pb.JobState, task_ids: Iterable[str]
) -> list[Effect]:
    """Build the DeployTask calls of the given tasks from the current state."""
    from coordinator import checkpoints

    where = placement(state, job)
    restore = checkpoints.restore_point(state, job)
    vertices = {vertex.id: vertex for vertex in job.graph.vertices}
    effects: list[Effect] = []
    for tid in task_ids:
        task = job.tasks[tid]
        descriptor = graphs.build_descriptor(
            job, vertices[task.job_vertex_id], task.subtask_index, where, restore
        )
        effects.append(
            DeployTask(
                task_manager_id=task.task_manager_id,
                endpoint=where[tid],
                job_id=job.job_id,
                task_id=tid,
                attempt=task.attempt,
                descriptor=descriptor,
                registration_id=registration_of(state, task.task_manager_id),
            )
        )
    return effects


def cancel_effects(state: pb.CoordinatorState, job: pb.JobState) -> list[Effect]:
    """Build CancelTask calls for every placed task of the job."""
    effects: list[Effect] = []
    for task in job.tasks.values():
        if task.status not in PLACED_TASK:
            continue
        request = svc.CancelTaskRequest(
            job_id=job.job_id,
            job_vertex_id=task.job_vertex_id,
            subtask_index=task.subtask_index,
            attempt=task.attempt,
        )
        endpoint = endpoint_of(state, task.task_manager_id)
        registration = registration_of(state, task.task_manager_id)
        effects.append(
            CancelTask(task.task_manager_id, endpoint, request, registration)
        )
    return effects


def effects_before(state: pb.CoordinatorState, ev: pb.Event) -> list[Effect]:
    """Effects that need the placement the event is about to end."""
    name = ev.WhichOneof("body")
    if name == "job_failing_over":
        return cancel_effects(state, state.jobs[ev.job_failing_over.job_id])
    if name == "job_restarted":
        return cancel_effects(state, state.jobs[ev.job_restarted.job_id])
    if name == "job_status_changed" and ev.job_status_changed.status in (
        pb.JOB_CANCELED,
        pb.JOB_FAILED,
    ):
        return cancel_effects(state, state.jobs[ev.job_status_changed.job_id])
    return []


def effects_after(state: pb.CoordinatorState, ev: pb.Event) -> list[Effect]:
    """Effects that need the state the event produced."""
    if ev.WhichOneof("body") == "tasks_assigned":
        body = ev.tasks_assigned
        job = state.jobs[body.job_id]
        return deploy_effects(state, job, [a.task_id for a in body.assignments])
    return []
