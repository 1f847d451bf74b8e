"""Reconciling the state with the tasks that workers report running.

Every heartbeat lists the task attempts the worker runs. An attempt that the
state does not place on that worker is cancelled: an attempt of a job that
ended, an older attempt, or one the state moved elsewhere. Its cancellation
may have been decided by a leader that died before sending it.

One heartbeat timeout after a takeover, the new leader also checks the
other direction, once. A task that ran at the takeover, on a worker that
has heartbeated since without listing it, is gone. It is failed, so its job
recovers from the latest completed checkpoint. Tasks that are still running
keep running with their attempt.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

from coordinator import taskmanagers
from coordinator.decision import (
    CancelTask,
    Context,
    Decision,
    Effect,
    endpoint_of,
    registration_of,
)
from coordinator.decision import event as make_event
from coordinator.ids import task_id
from coordinator.jobs import PLACED_TASK, TERMINAL_JOB
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobledger_types_pb2 as types_pb
from protos import jobmanager_internal_pb2 as fpb

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of one subtask."""

    job_id: str
    task_id: str
    attempt: int


def reported_attempts(running: Iterable[types_pb.RunningTask]) -> set[Attempt]:
    """Return the attempts of a heartbeat's ``running_tasks``."""
    return {
        Attempt(r.job_id, task_id(r.job_vertex_id, r.subtask_index), r.attempt)
        for r in running
        if r.job_id and r.job_vertex_id and r.subtask_index >= 0
    }


def running_at_takeover(state: pb.CoordinatorState) -> dict[str, set[Attempt]]:
    """Map each worker to the attempts the state has running on it."""
    placed: dict[str, set[Attempt]] = {}
    for job in state.jobs.values():
        if job.status in TERMINAL_JOB:
            continue
        for tid, task in job.tasks.items():
            if task.status == pb.TASK_RUNNING and task.task_manager_id:
                placed.setdefault(task.task_manager_id, set()).add(
                    Attempt(job.job_id, tid, task.attempt)
                )
    return placed


def decide_heartbeat(
    ctx: Context,
    tm_id: str,
    incarnation: int,
    metrics: list[fpb.TaskMetricData],
    running: list[types_pb.RunningTask],
) -> Decision:
    """Record a heartbeat and cancel the attempts the worker should not run.

    The reply is False for a worker that must register again; such a
    worker's report is not acted on.
    """
    decision = taskmanagers.decide_heartbeat(ctx, tm_id, incarnation, metrics)
    if decision.reply:
        decision.effects += _stray_cancellations(ctx.state, tm_id, running)
    return decision


def _stray_cancellations(
    state: pb.CoordinatorState, tm_id: str, running: list[types_pb.RunningTask]
) -> list[Effect]:
    effects: list[Effect] = []
    endpoint = endpoint_of(state, tm_id)
    registration = registration_of(state, tm_id)
    for reported in running:
        if not _is_stray(state, tm_id, reported):
            continue
        logger.info(
            "task %s_%d attempt %d of job %s runs on %s without being placed "
            "there; cancelling it",
            reported.job_vertex_id,
            reported.subtask_index,
            reported.attempt,
            reported.job_id,
            tm_id,
        )
        request = svc.CancelTaskRequest(
            job_id=reported.job_id,
            job_vertex_id=reported.job_vertex_id,
            subtask_index=reported.subtask_index,
            attempt=reported.attempt,
        )
        effects.append(CancelTask(tm_id, endpoint, request, registration))
    return effects


def _is_stray(
    state: pb.CoordinatorState, tm_id: str, reported: types_pb.RunningTask
) -> bool:
    job = state.jobs.get(reported.job_id)
    if job is None or job.status in TERMINAL_JOB:
        return True
    task = job.tasks.get(task_id(reported.job_vertex_id, reported.subtask_index))
    return (
        task is None
        or task.attempt != reported.attempt
        or task.task_manager_id != tm_id
        or task.status not in PLACED_TASK
    )


def decide_gone_tasks(
    ctx: Context,
    at_takeover: Mapping[str, set[Attempt]],
    reported: Mapping[str, set[Attempt]],
) -> Decision:
    """Fail the tasks that ran at the takeover but that their worker, alive
    and heartbeating since, no longer lists.

    ``reported`` maps each worker that heartbeated since the takeover to
    every attempt it listed since. Workers that stayed silent are left to
    the heartbeat timeout.
    """
    # NOTE: a task that finished just before the takeover is absent from the
    # heartbeats too. Its FINISHED report, which the worker retries, normally
    # arrives well within the heartbeat timeout, so before this check runs.
    events: list[pb.Event] = []
    for tm_id, attempts in sorted(at_takeover.items()):
        listed = reported.get(tm_id)
        if listed is None:
            continue
        for gone in sorted(attempts - listed, key=lambda a: (a.job_id, a.task_id)):
            events += _fail_gone(ctx.state, tm_id, gone)
    return Decision(events)


def _fail_gone(state: pb.CoordinatorState, tm_id: str, gone: Attempt) -> list[pb.Event]:
    job = state.jobs.get(gone.job_id)
    task = job.tasks.get(gone.task_id) if job is not None else None
    if job is None or task is None or job.status in TERMINAL_JOB:
        return []
    if task.attempt != gone.attempt or task.status != pb.TASK_RUNNING:
        return []
    logger.warning(
        "task %s attempt %d of job %s no longer runs on %s after the leader change",
        gone.task_id,
        gone.attempt,
        gone.job_id,
        tm_id,
    )
    changed = pb.TaskStatusChanged(
        job_id=gone.job_id,
        task_id=gone.task_id,
        attempt=gone.attempt,
        status=pb.TASK_FAILED,
        reason=f"task manager {tm_id} no longer runs it after the leader change",
    )
    return [make_event(task_status_changed=changed)]
