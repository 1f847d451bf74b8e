"""The checkpoint coordinator: apply functions, decisions and rules.

Checkpoint ids are unique across jobs and ascend across restarts and
leader changes, since the last id issued is part of the replayed state.
Acknowledgements are classified as Flink classifies them: a duplicate of
one already recorded is ignored; one for a checkpoint that already ended
without completing (declined, expired, aborted, or pruned from the
history) is late, and its state handle is released; one for an id never
issued, or issued to another job, is unknown and rejected.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Mapping

from coordinator.decision import (
    Context,
    Decision,
    DiscardSnapshots,
    Effect,
    NotifyCheckpointAborted,
    NotifyCheckpointComplete,
    TriggerCheckpoint,
    endpoint_of,
    event,
    registration_of,
)
from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound
from coordinator.jobs import get_job
from observability import spans
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobmanager_internal_pb2 as fpb

logger = logging.getLogger(__name__)

# Failed and discarded checkpoints kept per job, for the admin listing.
HISTORY = 10

ENDED = frozenset({pb.CHECKPOINT_FAILED, pb.CHECKPOINT_DISCARDED})


class AckOutcome(enum.Enum):
    """The class of an acknowledgement."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    LATE = "late"


# ------------------------------------------------------------------ apply


def _apply_triggered(
    state: pb.CoordinatorState, body: pb.CheckpointTriggered, event: pb.Event
) -> None:
    if body.checkpoint_id <= state.last_checkpoint_id:
        raise ValueError(
            f"checkpoint id {body.checkpoint_id} does not ascend past "
            f"{state.last_checkpoint_id}"
        )
    checkpoint = state.checkpoints[body.checkpoint_id]
    checkpoint.checkpoint_id = body.checkpoint_id
    checkpoint.job_id = body.job_id
    checkpoint.status = pb.CHECKPOINT_PENDING
    checkpoint.triggered_ms = event.timestamp.ToMilliseconds()
    checkpoint.tasks_to_acknowledge.extend(body.tasks_to_acknowledge)
    checkpoint.trace_context.update(body.trace_context)
    checkpoint.manual = body.manual
    state.last_checkpoint_id = body.checkpoint_id


def _apply_acknowledged(
    state: pb.CoordinatorState, body: pb.CheckpointAcknowledged, event: pb.Event
) -> None:
    checkpoint = state.checkpoints[body.checkpoint_id]
    if checkpoint.status != pb.CHECKPOINT_PENDING:
        raise ValueError(f"checkpoint {body.checkpoint_id} is not pending")
    ack = body.acknowledgement
    checkpoint.acknowledgements[ack.task_id].CopyFrom(ack)


def _apply_completed(
    state: pb.CoordinatorState, body: pb.CheckpointCompleted, event: pb.Event
) -> None:
    now = event.timestamp.ToMilliseconds()
    checkpoint = state.checkpoints[body.checkpoint_id]
    checkpoint.status = pb.CHECKPOINT_COMPLETED
    checkpoint.finished_ms = now
    job = state.jobs[body.job_id]
    job.latest_completed_checkpoint_id = body.checkpoint_id
    job.failed_checkpoints_in_row = 0
    job.last_checkpoint_end_ms = now


def _apply_failed(
    state: pb.CoordinatorState, body: pb.CheckpointFailed, event: pb.Event
) -> None:
    now = event.timestamp.ToMilliseconds()
    checkpoint = state.checkpoints[body.checkpoint_id]
    checkpoint.status = pb.CHECKPOINT_FAILED
    checkpoint.failure = body.failure
    checkpoint.failure_message = body.message
    checkpoint.finished_ms = now
    job = state.jobs[body.job_id]
    if body.counts_against_tolerance:
        job.failed_checkpoints_in_row += 1
    job.last_checkpoint_end_ms = now
    _prune_history(state, body.job_id)


def _apply_discarded(
    state: pb.CoordinatorState, body: pb.CheckpointDiscarded, event: pb.Event
) -> None:
    checkpoint = state.checkpoints[body.checkpoint_id]
    checkpoint.status = pb.CHECKPOINT_DISCARDED
    _prune_history(state, body.job_id)


def _prune_history(state: pb.CoordinatorState, job_id: str) -> None:
    ended = sorted(
        cid
        for cid, checkpoint in state.checkpoints.items()
        if checkpoint.job_id == job_id and checkpoint.status in ENDED
    )
    for cid in ended[:-HISTORY]:
        del state.checkpoints[cid]


APPLIERS: dict[str, Callable[..., None]] = {
    "checkpoint_triggered": _apply_triggered,
    "checkpoint_acknowledged": _apply_acknowledged,
    "checkpoint_completed": _apply_completed,
    "checkpoint_failed": _apply_failed,
    "checkpoint_discarded": _apply_discarded,
}


# ------------------------------------------------------------------ queries


def pending_of(state: pb.CoordinatorState, job_id: str) -> list[pb.CheckpointState]:
    """Return the job's pending checkpoints, oldest first."""
    return sorted(
        (
            c
            for c in state.checkpoints.values()
            if c.job_id == job_id and c.status == pb.CHECKPOINT_PENDING
        ),
        key=lambda c: c.checkpoint_id,
    )


def restorable(
    state: pb.CoordinatorState, job: pb.JobState, checkpoint_id: int
) -> pb.CheckpointState:
    """Return the completed checkpoint to restore (0: the latest) or raise."""
    if checkpoint_id < 0:
        raise InvalidArgument(
            f"checkpoint_id {checkpoint_id} is negative; give a checkpoint id, "
            "or 0 for the latest completed one"
        )
    if checkpoint_id == 0:
        checkpoint_id = job.latest_completed_checkpoint_id
        if checkpoint_id == 0:
            raise FailedPrecondition(
                f"job {job.job_id} has no completed checkpoint to recover from"
            )
    checkpoint = state.checkpoints.get(checkpoint_id)
    if checkpoint is None or checkpoint.job_id != job.job_id:
        raise NotFound(
            f"checkpoint {checkpoint_id} of job {job.job_id} not found; list them "
            f"with `jobledger checkpoints {job.job_id}`"
        )
    if checkpoint.status != pb.CHECKPOINT_COMPLETED:
        raise FailedPrecondition(
            f"checkpoint {checkpoint_id} of job {job.job_id} is "
            f"{pb.CheckpointStatus.Name(checkpoint.status)}, not completed; "
            "recover from a retained completed checkpoint"
        )
    return checkpoint


def restore_point(
    state: pb.CoordinatorState, job: pb.JobState
) -> pb.CheckpointState | None:
    """Return the checkpoint the job's current attempts restore, if any."""
    if job.restore_checkpoint_id == 0:
        return None
    return state.checkpoints.get(job.restore_checkpoint_id)


# ------------------------------------------------------------------ decide


def _can_trigger(ctx: Context, job: pb.JobState) -> str | None:
    """Return why the job cannot be checkpointed now, or None."""
    if job.status != pb.JOB_RUNNING:
        return f"job {job.job_id} is {pb.JobStatus.Name(job.status)}, not running"
    not_running = [tid for tid, t in job.tasks.items() if t.status != pb.TASK_RUNNING]
    if not_running:
        return f"task {min(not_running)} of job {job.job_id} is not running yet"
    pending = len(pending_of(ctx.state, job.job_id))
    maximum = ctx.config.checkpoints.max_concurrent
    if pending >= maximum:
        return (
            f"job {job.job_id} has {pending} checkpoint(s) pending, the maximum "
            f"of concurrent checkpoints is {maximum}"
        )
    return None


def _trigger_event(
    ctx: Context, job: pb.JobState, checkpoint_id: int, manual: bool
) -> pb.Event:
    tasks = sorted(job.tasks)
    triggered = pb.CheckpointTriggered(
        checkpoint_id=checkpoint_id,
        job_id=job.job_id,
        tasks_to_acknowledge=tasks,
        manual=manual,
        # The root span of the checkpoint's trace; what any coordinator
        # records for this checkpoint later joins it through this context.
        trace_context=spans.trigger_span(job.job_id, checkpoint_id, len(tasks), manual),
    )
    return event(checkpoint_triggered=triggered)


def decide_request(ctx: Context, job_id: str) -> Decision:
    """Trigger a checkpoint now, of one job or of every running job.

    For one job, raises FailedPrecondition when it cannot be checkpointed.
    The reply is the list of checkpoint ids triggered.
    """
    if job_id:
        job = get_job(ctx.state, job_id)
        reason = _can_trigger(ctx, job)
        if reason is not None:
            raise FailedPrecondition(f"cannot checkpoint now: {reason}")
        candidates = [job]
    else:
        candidates = [
            j
            for j in sorted(ctx.state.jobs.values(), key=lambda j: j.submitted_ms)
            if _can_trigger(ctx, j) is None
        ]
    events = []
    next_id = ctx.state.last_checkpoint_id
    for job in candidates:
        next_id += 1
        events.append(_trigger_event(ctx, job, next_id, manual=True))
    return Decision(
        events, reply=[e.checkpoint_triggered.checkpoint_id for e in events]
    )


def decide_periodic(ctx: Context, job_id: str) -> Decision:
    """Trigger the job's periodic checkpoint, or nothing when it is not due."""
    job = ctx.state.jobs.get(job_id)
    if job is None or _can_trigger(ctx, job) is not None:
        return Decision()
    min_pause_ms = ctx.config.checkpoints.min_pause_s * 1000
    if (
        job.last_checkpoint_end_ms
        and ctx.now_ms - job.last_checkpoint_end_ms < min_pause_ms
    ):
        return Decision()
    return Decision([_trigger_event(ctx, job, ctx.state.last_checkpoint_id + 1, False)])


def decide_acknowledge(
    ctx: Context,
    job_id: str,
    checkpoint_id: int,
    ack: pb.TaskAcknowledgement,
) -> Decision:
    """Record a task's acknowledgement; the reply is its AckOutcome.

    ``job_id`` may be empty (ReportStateCompletion carries none): checkpoint
    ids are unique across jobs. Raises NotFound for an unknown checkpoint
    and InvalidArgument for a task the checkpoint does not wait for.
    """
    checkpoint = _known_checkpoint(ctx.state, job_id, checkpoint_id)
    owner = checkpoint.job_id if checkpoint is not None else job_id
    ack = _with_task_manager(ctx.state, owner, ack)
    if checkpoint is None or checkpoint.status == pb.CHECKPOINT_FAILED:
        return _late(ctx.state, checkpoint_id, ack)
    if ack.task_id not in checkpoint.tasks_to_acknowledge:
        raise InvalidArgument(
            f"task {ack.task_id} is not a task of checkpoint {checkpoint_id} of "
            f"job {checkpoint.job_id}"
        )
    if checkpoint.status != pb.CHECKPOINT_PENDING:
        return Decision(reply=AckOutcome.DUPLICATE)
    if ack.task_id in checkpoint.acknowledgements:
        return Decision(reply=AckOutcome.DUPLICATE)
    recorded = pb.TaskAcknowledgement()
    recorded.CopyFrom(ack)
    recorded.acknowledged_ms = ctx.now_ms
    acknowledged = pb.CheckpointAcknowledged(
        checkpoint_id=checkpoint_id,
        job_id=checkpoint.job_id,
        acknowledgement=recorded,
    )
    return Decision([event(checkpoint_acknowledged=acknowledged)], AckOutcome.ACCEPTED)


def _known_checkpoint(
    state: pb.CoordinatorState, job_id: str, checkpoint_id: int
) -> pb.CheckpointState | None:
    """Return the checkpoint, None for an ended one pruned from the history,
    or raise NotFound for an id never issued to this job."""
    if checkpoint_id <= 0 or checkpoint_id > state.last_checkpoint_id:
        raise NotFound(
            f"checkpoint {checkpoint_id} was never triggered; the latest id "
            f"issued is {state.last_checkpoint_id}"
        )
    if job_id and job_id not in state.jobs:
        raise NotFound(f"job {job_id} not found")
    checkpoint = state.checkpoints.get(checkpoint_id)
    if checkpoint is not None and job_id and checkpoint.job_id != job_id:
        raise NotFound(
            f"checkpoint {checkpoint_id} belongs to job {checkpoint.job_id}, "
            f"not to job {job_id}"
        )
    return checkpoint


def _with_task_manager(
    state: pb.CoordinatorState, job_id: str, ack: pb.TaskAcknowledgement
) -> pb.TaskAcknowledgement:
    """Fill in the task manager of an acknowledgement that names none.

    ReportStateCompletion carries no task manager id, and without one the
    snapshot handle could never be released, so the task manager the task
    is placed on now is recorded instead.
    """
    # NOTE: after a restart that moved the task, the current placement may
    # not be the worker that wrote the snapshot.
    if ack.task_manager_id:
        return ack
    job = state.jobs.get(job_id)
    task = job.tasks.get(ack.task_id) if job is not None else None
    if task is None or not task.task_manager_id:
        return ack
    filled = pb.TaskAcknowledgement()
    filled.CopyFrom(ack)
    filled.task_manager_id = task.task_manager_id
    return filled


def _late(
    state: pb.CoordinatorState, checkpoint_id: int, ack: pb.TaskAcknowledgement
) -> Decision:
    effects: list[Effect] = []
    if ack.snapshot_handle and ack.task_manager_id:
        request = svc.DiscardSnapshotsRequest(snapshot_handles=[ack.snapshot_handle])
        endpoint = endpoint_of(state, ack.task_manager_id)
        if endpoint:
            registration = registration_of(state, ack.task_manager_id)
            effects.append(
                DiscardSnapshots(ack.task_manager_id, endpoint, request, registration)
            )
    logger.info(
        "late acknowledgement of checkpoint %d by task %s; releasing its state",
        checkpoint_id,
        ack.task_id,
    )
    return Decision(reply=AckOutcome.LATE, effects=effects)


def decide_decline(
    ctx: Context, job_id: str, checkpoint_id: int, tid: str, reason: str
) -> Decision:
    """Fail a pending checkpoint that a task could not snapshot.

    A report for a checkpoint that already ended (older than the latest
    completed one, or failed already) changes nothing and does not count
    against the tolerance.
    """
    checkpoint = _known_checkpoint(ctx.state, job_id, checkpoint_id)
    if checkpoint is None or checkpoint.status != pb.CHECKPOINT_PENDING:
        logger.info(
            "failure report for checkpoint %d by task %s ignored: it already ended",
            checkpoint_id,
            tid,
        )
        return Decision(reply=False)
    failed = pb.CheckpointFailed(
        checkpoint_id=checkpoint_id,
        job_id=checkpoint.job_id,
        failure=pb.CHECKPOINT_DECLINED,
        message=f"task {tid} declined: {reason or 'no reason given'}",
        task_id=tid,
        counts_against_tolerance=True,
    )
    return Decision([event(checkpoint_failed=failed)], reply=True)


def decide_expire(ctx: Context, checkpoint_id: int) -> Decision:
    """Fail a checkpoint whose timeout passed before every task acknowledged."""
    checkpoint = ctx.state.checkpoints.get(checkpoint_id)
    if checkpoint is None or checkpoint.status != pb.CHECKPOINT_PENDING:
        return Decision()
    timeout_ms = ctx.config.checkpoints.timeout_s * 1000
    if ctx.now_ms - checkpoint.triggered_ms < timeout_ms:
        return Decision()
    missing = sorted(
        set(checkpoint.tasks_to_acknowledge) - set(checkpoint.acknowledgements)
    )
    failed = pb.CheckpointFailed(
        checkpoint_id=checkpoint_id,
        job_id=checkpoint.job_id,
        failure=pb.CHECKPOINT_EXPIRED,
        message=(
            f"expired after {ctx.config.checkpoints.timeout_s:g} s; "
            f"{len(missing)} task(s) did not acknowledge, first {missing[0]}"
            if missing
            else f"expired after {ctx.config.checkpoints.timeout_s:g} s"
        ),
        counts_against_tolerance=True,
    )
    return Decision([event(checkpoint_failed=failed)])


def decide_trigger_failed(
    ctx: Context,
    checkpoint_id: int,
    task_manager_id: str,
    reason: str,
    rejected: bool = False,
) -> Decision:
    """Fail a pending checkpoint whose trigger did not reach a task manager.

    ``rejected`` means the task manager replied that no source of the job
    runs there: a source finished, or has not started yet. Like Flink's
    NOT_ALL_REQUIRED_TASKS_RUNNING, that aborts the checkpoint without
    counting against the tolerance, so a job whose sources are finishing is
    not failed over for it.
    """
    checkpoint = ctx.state.checkpoints.get(checkpoint_id)
    if checkpoint is None or checkpoint.status != pb.CHECKPOINT_PENDING:
        return Decision()
    failed = pb.CheckpointFailed(
        checkpoint_id=checkpoint_id,
        job_id=checkpoint.job_id,
        failure=pb.CHECKPOINT_ABORTED if rejected else pb.CHECKPOINT_DECLINED,
        message=f"trigger failed on task manager {task_manager_id}: {reason}",
        counts_against_tolerance=not rejected,
    )
    return Decision([event(checkpoint_failed=failed)])


def abort_pending(ctx: Context, job_id: str, reason: str) -> list[pb.Event]:
    """Decide the abortion of the job's pending checkpoints; not counted."""
    return [
        event(
            checkpoint_failed=pb.CheckpointFailed(
                checkpoint_id=c.checkpoint_id,
                job_id=job_id,
                failure=pb.CHECKPOINT_ABORTED,
                message=reason,
                counts_against_tolerance=False,
            )
        )
        for c in pending_of(ctx.state, job_id)
    ]


# ------------------------------------------------------------------ rules


def rule_complete(ctx: Context, job_ids: Iterable[str]) -> list[pb.Event]:
    """Complete pending checkpoints that every task has acknowledged.

    Completing a checkpoint aborts older pending ones of the job, which it
    subsumes, and discards completed ones beyond the retained count.
    """
    events: list[pb.Event] = []
    for job_id in job_ids:
        pending = pending_of(ctx.state, job_id)
        done = [
            c for c in pending if len(c.acknowledgements) == len(c.tasks_to_acknowledge)
        ]
        if not done:
            continue
        newest = done[-1]
        for older in pending:
            if older.checkpoint_id < newest.checkpoint_id:
                subsumed = pb.CheckpointFailed(
                    checkpoint_id=older.checkpoint_id,
                    job_id=job_id,
                    failure=pb.CHECKPOINT_ABORTED,
                    message=f"subsumed by checkpoint {newest.checkpoint_id}",
                )
                events.append(event(checkpoint_failed=subsumed))
        completed = pb.CheckpointCompleted(
            checkpoint_id=newest.checkpoint_id, job_id=job_id
        )
        events.append(event(checkpoint_completed=completed))
        events += _discard_beyond_retained(ctx, job_id, newest.checkpoint_id)
    return events


def _discard_beyond_retained(ctx: Context, job_id: str, newest: int) -> list[pb.Event]:
    completed = sorted(
        [
            cid
            for cid, c in ctx.state.checkpoints.items()
            if c.job_id == job_id and c.status == pb.CHECKPOINT_COMPLETED
        ]
        + [newest]
    )
    retained = max(1, ctx.config.checkpoints.retained)
    return [
        event(
            checkpoint_discarded=pb.CheckpointDiscarded(
                checkpoint_id=cid, job_id=job_id
            )
        )
        for cid in completed[:-retained]
    ]


# ------------------------------------------------------------------ effects


def _task_managers_of(state: pb.CoordinatorState, job_id: str) -> list[str]:
    job = state.jobs.get(job_id)
    if job is None:
        return []
    return sorted(
        {
            t.task_manager_id
            for t in job.tasks.values()
            if t.task_manager_id and t.status in (pb.TASK_DEPLOYING, pb.TASK_RUNNING)
        }
    )


def trigger_effects(
    state: pb.CoordinatorState, checkpoint: pb.CheckpointState
) -> list[Effect]:
    """Build one TriggerTaskCheckpoint call per task manager running a source."""
    job = state.jobs[checkpoint.job_id]
    sources = {v.id for v in job.graph.vertices if v.vertex_type == fpb.SOURCE}
    tm_ids = sorted(
        {t.task_manager_id for t in job.tasks.values() if t.job_vertex_id in sources}
    )
    effects: list[Effect] = []
    for tm_id in tm_ids:
        request = fpb.TriggerCheckpointRequest(
            job_manager_id=state.leader_id,
            job_id=checkpoint.job_id,
            checkpoint_id=checkpoint.checkpoint_id,
            checkpoint_timestamp=checkpoint.triggered_ms,
            trace_context=checkpoint.trace_context,
        )
        effects.append(
            TriggerCheckpoint(
                tm_id,
                endpoint_of(state, tm_id),
                request,
                registration_of(state, tm_id),
            )
        )
    return effects


def _discard_effects(
    state: pb.CoordinatorState, acks: Mapping[str, pb.TaskAcknowledgement]
) -> list[Effect]:
    handles: dict[str, list[str]] = {}
    for ack in acks.values():
        if ack.snapshot_handle and ack.task_manager_id:
            handles.setdefault(ack.task_manager_id, []).append(ack.snapshot_handle)
    effects: list[Effect] = []
    for tm_id, tm_handles in sorted(handles.items()):
        endpoint = endpoint_of(state, tm_id)
        if endpoint:
            request = svc.DiscardSnapshotsRequest(snapshot_handles=sorted(tm_handles))
            registration = registration_of(state, tm_id)
            effects.append(DiscardSnapshots(tm_id, endpoint, request, registration))
    return effects


def effects_before(state: pb.CoordinatorState, ev: pb.Event) -> list[Effect]:
    """Effects that need the checkpoint as it was before the event."""
    name = ev.WhichOneof("body")
    if name == "checkpoint_failed":
        body = ev.checkpoint_failed
        effects = _discard_effects(
            state, state.checkpoints[body.checkpoint_id].acknowledgements
        )
        request = svc.NotifyCheckpointAbortedRequest(
            job_id=body.job_id, checkpoint_id=body.checkpoint_id
        )
        for tm_id in _task_managers_of(state, body.job_id):
            effects.append(
                NotifyCheckpointAborted(
                    tm_id,
                    endpoint_of(state, tm_id),
                    request,
                    registration_of(state, tm_id),
                )
            )
        return effects
    if name == "checkpoint_discarded":
        checkpoint = state.checkpoints[ev.checkpoint_discarded.checkpoint_id]
        return _discard_effects(state, checkpoint.acknowledgements)
    return []


def effects_after(state: pb.CoordinatorState, ev: pb.Event) -> list[Effect]:
    """Effects that need the state the event produced."""
    name = ev.WhichOneof("body")
    if name == "checkpoint_triggered":
        return trigger_effects(
            state, state.checkpoints[ev.checkpoint_triggered.checkpoint_id]
        )
    if name == "checkpoint_completed":
        body = ev.checkpoint_completed
        request = svc.NotifyCheckpointCompleteRequest(
            job_id=body.job_id, checkpoint_id=body.checkpoint_id
        )
        return [
            NotifyCheckpointComplete(
                tm_id,
                endpoint_of(state, tm_id),
                request,
                registration_of(state, tm_id),
            )
            for tm_id in _task_managers_of(state, body.job_id)
        ]
    return []
