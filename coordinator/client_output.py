"""Tables for people and JSON for scripts, from the coordinator's messages.

The JSON objects use plain numbers for ids, counts and milliseconds since the
Unix epoch, and status names without their enum prefix (``RUNNING``, not
``JOB_RUNNING``), the same names the tables show. Job graphs and event
bodies are the exception: they follow protobuf's JSON mapping.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc

_DETAILS_WIDTH = 100


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Return rows under headers in left-aligned columns, two spaces apart."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in cells:
        widths = [
            max(width, len(cell)) for width, cell in zip(widths, row, strict=True)
        ]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [list(headers), *cells]
    ]
    return "\n".join(line.rstrip() for line in lines)


def dumps(value: object) -> str:
    """Return ``value`` as indented JSON."""
    return json.dumps(value, indent=2, sort_keys=False)


def timestamp(ms: int) -> str:
    """Format milliseconds since the Unix epoch as local time, or "-" for 0."""
    if not ms:
        return "-"
    moment = datetime.datetime.fromtimestamp(ms / 1000).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def status_name(enum_type: Any, value: int, prefix: str) -> str:
    """Return an enum value's name without ``prefix``, e.g. RUNNING."""
    name = str(enum_type.Name(value))
    return name.removeprefix(prefix)


def job_status(value: int) -> str:
    return status_name(pb.JobStatus, value, "JOB_")


def task_status(value: int) -> str:
    return status_name(pb.TaskStatus, value, "TASK_")


def checkpoint_status(value: int) -> str:
    return status_name(pb.CheckpointStatus, value, "CHECKPOINT_")


def checkpoint_failure(value: int) -> str:
    if value == pb.CHECKPOINT_FAILURE_REASON_UNSPECIFIED:
        return ""
    return status_name(pb.CheckpointFailureReason, value, "CHECKPOINT_")


def task_manager_status(value: int) -> str:
    return status_name(pb.TaskManagerStatus, value, "TASK_MANAGER_")


# ------------------------------------------------------------------ jobs


def job_summary_json(job: svc.JobSummary) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "job_name": job.job_name,
        "status": job_status(job.status),
        "submitted_ms": job.submitted_ms,
        "tasks": job.tasks,
        "tasks_running": job.tasks_running,
        "restarts": job.restarts,
        "latest_completed_checkpoint_id": job.latest_completed_checkpoint_id,
    }


def summarize_job(job: pb.JobState) -> svc.JobSummary:
    """Return the summary ListJobs returns for ``job``, for replayed state."""
    running = sum(1 for task in job.tasks.values() if task.status == pb.TASK_RUNNING)
    return svc.JobSummary(
        job_id=job.job_id,
        job_name=job.graph.job_name,
        status=job.status,
        submitted_ms=job.submitted_ms,
        tasks=len(job.tasks),
        tasks_running=running,
        restarts=job.restarts,
        latest_completed_checkpoint_id=job.latest_completed_checkpoint_id,
    )


def jobs_table(jobs: Sequence[svc.JobSummary]) -> str:
    if not jobs:
        return "no jobs"
    headers = ("JOB", "NAME", "STATUS", "TASKS", "RESTARTS", "CHECKPOINT", "SUBMITTED")
    rows = [
        (
            job.job_id,
            job.job_name,
            job_status(job.status),
            f"{job.tasks_running}/{job.tasks} running",
            job.restarts,
            job.latest_completed_checkpoint_id or "-",
            timestamp(job.submitted_ms),
        )
        for job in jobs
    ]
    return table(headers, rows)


def _ordered_tasks(job: pb.JobState) -> list[tuple[str, pb.TaskState]]:
    return sorted(
        job.tasks.items(),
        key=lambda item: (item[1].job_vertex_id, item[1].subtask_index),
    )


def job_json(job: pb.JobState) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "job_name": job.graph.job_name,
        "status": job_status(job.status),
        "submitted_ms": job.submitted_ms,
        "status_changed_ms": job.status_changed_ms,
        "restarts": job.restarts,
        "failure_reason": job.failure_reason,
        "restore_checkpoint_id": job.restore_checkpoint_id,
        "latest_completed_checkpoint_id": job.latest_completed_checkpoint_id,
        "failed_checkpoints_in_row": job.failed_checkpoints_in_row,
        "tasks": [_task_json(task_id, task) for task_id, task in _ordered_tasks(job)],
        "graph": json_format.MessageToDict(job.graph, preserving_proto_field_name=True),
    }


def _task_json(task_id: str, task: pb.TaskState) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "job_vertex_id": task.job_vertex_id,
        "subtask_index": task.subtask_index,
        "attempt": task.attempt,
        "status": task_status(task.status),
        "task_manager_id": task.task_manager_id,
        "health_status": task.health_status,
        "records_in": task.records_in,
        "records_out": task.records_out,
        "failure_reason": task.failure_reason,
    }


def job_text(job: pb.JobState) -> str:
    fields = [
        ("job", job.job_id),
        ("name", job.graph.job_name),
        ("status", job_status(job.status)),
        ("submitted", timestamp(job.submitted_ms)),
        ("restarts", job.restarts),
        ("latest checkpoint", job.latest_completed_checkpoint_id or "-"),
        ("restored from", job.restore_checkpoint_id or "-"),
    ]
    if job.failure_reason:
        fields.append(("last failure", job.failure_reason))
    width = max(len(name) for name, _ in fields)
    header = "\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in fields)
    headers = ("TASK", "STATUS", "ATTEMPT", "TASK MANAGER", "IN", "OUT", "HEALTH")
    rows = [
        (
            task_id,
            task_status(task.status),
            task.attempt,
            task.task_manager_id or "-",
            task.records_in,
            task.records_out,
            task.health_status or "-",
        )
        for task_id, task in _ordered_tasks(job)
    ]
    return f"{header}\n\n{table(headers, rows)}"


# ------------------------------------------------------------------ checkpoints


def summarize_checkpoint(checkpoint: pb.CheckpointState) -> svc.CheckpointSummary:
    """Return the summary ListCheckpoints returns, for replayed state."""
    finished = checkpoint.finished_ms
    return svc.CheckpointSummary(
        checkpoint_id=checkpoint.checkpoint_id,
        status=checkpoint.status,
        triggered_ms=checkpoint.triggered_ms,
        finished_ms=finished,
        duration_ms=finished - checkpoint.triggered_ms if finished else 0,
        size=sum(ack.snapshot_size for ack in checkpoint.acknowledgements.values()),
        acknowledged_tasks=len(checkpoint.acknowledgements),
        total_tasks=len(checkpoint.tasks_to_acknowledge),
        failure=checkpoint.failure,
        failure_message=checkpoint.failure_message,
    )


def checkpoint_json(checkpoint: svc.CheckpointSummary) -> dict[str, Any]:
    return {
        "checkpoint_id": checkpoint.checkpoint_id,
        "status": checkpoint_status(checkpoint.status),
        "triggered_ms": checkpoint.triggered_ms,
        "finished_ms": checkpoint.finished_ms,
        "duration_ms": checkpoint.duration_ms,
        "size_bytes": checkpoint.size,
        "acknowledged_tasks": checkpoint.acknowledged_tasks,
        "total_tasks": checkpoint.total_tasks,
        "failure": checkpoint_failure(checkpoint.failure),
        "failure_message": checkpoint.failure_message,
    }


def checkpoints_table(checkpoints: Sequence[svc.CheckpointSummary]) -> str:
    if not checkpoints:
        return "no checkpoints"
    headers = ("ID", "STATUS", "TRIGGERED", "DURATION", "SIZE", "ACKED", "FAILURE")
    rows = [
        (
            checkpoint.checkpoint_id,
            checkpoint_status(checkpoint.status),
            timestamp(checkpoint.triggered_ms),
            f"{checkpoint.duration_ms} ms" if checkpoint.finished_ms else "-",
            f"{checkpoint.size} B",
            f"{checkpoint.acknowledged_tasks}/{checkpoint.total_tasks}",
            _failure_text(checkpoint),
        )
        for checkpoint in checkpoints
    ]
    return table(headers, rows)


def _failure_text(checkpoint: svc.CheckpointSummary) -> str:
    reason = checkpoint_failure(checkpoint.failure)
    if checkpoint.failure_message:
        return f"{reason}: {checkpoint.failure_message}" if reason else reason
    return reason or "-"


# ------------------------------------------------------------------ task managers


def task_manager_json(summary: svc.TaskManagerSummary) -> dict[str, Any]:
    tm = summary.task_manager
    return {
        "task_manager_id": tm.task_manager_id,
        "address": f"{tm.address}:{tm.port}",
        "status": task_manager_status(tm.status),
        "slots": tm.slots,
        "slots_free": summary.slots_free,
        "registered_ms": tm.registered_ms,
        "last_heartbeat_ms": tm.last_heartbeat_ms,
        "lost_reason": tm.lost_reason,
    }


def task_managers_table(summaries: Sequence[svc.TaskManagerSummary]) -> str:
    if not summaries:
        return "no task managers"
    headers = ("TASK MANAGER", "ADDRESS", "STATUS", "SLOTS", "FREE", "LAST HEARTBEAT")
    rows = [
        (
            s.task_manager.task_manager_id,
            f"{s.task_manager.address}:{s.task_manager.port}",
            task_manager_status(s.task_manager.status),
            s.task_manager.slots,
            s.slots_free,
            timestamp(s.task_manager.last_heartbeat_ms),
        )
        for s in summaries
    ]
    return table(headers, rows)


# ------------------------------------------------------------------ events


def event_json(event: pb.Event) -> dict[str, Any]:
    """Return one event as JSON; the body uses protobuf's JSON mapping, which
    writes 64-bit integers as strings."""
    body_type = event.WhichOneof("body") or ""
    body: Message = getattr(event, body_type) if body_type else pb.Event()
    return {
        "seq": event.seq,
        "epoch": event.epoch,
        "timestamp_ms": event.timestamp.ToMilliseconds(),
        "type": body_type,
        "body": json_format.MessageToDict(body, preserving_proto_field_name=True),
    }


def event_row(event: pb.Event) -> tuple[object, ...]:
    body_type = event.WhichOneof("body") or ""
    details = _details(getattr(event, body_type)) if body_type else ""
    if len(details) > _DETAILS_WIDTH:
        details = details[: _DETAILS_WIDTH - 3] + "..."
    return (
        event.seq,
        event.epoch,
        timestamp(event.timestamp.ToMilliseconds()),
        body_type,
        details,
    )


EVENT_HEADERS = ("SEQ", "EPOCH", "TIME", "TYPE", "DETAILS")


def _details(body: Message) -> str:
    """Return the body's scalar and enum fields as ``name=value`` pairs.

    Nested messages are left out, except a job graph, which shows its job
    name; ``--json`` prints the body whole.
    """
    parts = []
    for field, value in body.ListFields():
        if field.message_type is not None:
            if field.message_type.name == "JobGraph":
                parts.append(f"job_name={_scalar_text(value.job_name)}")
            continue
        values = _as_list(field, value)
        if field.enum_type is not None:
            texts = [field.enum_type.values_by_number[v].name for v in values]
        else:
            texts = [_scalar_text(v) for v in values]
        parts.append(f"{field.name}={','.join(texts)}")
    return " ".join(parts)


def _scalar_text(value: object) -> str:
    text = str(value)
    # Quote text with spaces, so that the name=value pairs stay apart.
    if isinstance(value, str) and (" " in text or not text):
        return repr(text)
    return text


def _as_list(field: Any, value: Any) -> list[Any]:
    return list(value) if _is_repeated(field) else [value]


def _is_repeated(field: Any) -> bool:
    # FieldDescriptor of protobuf 7.36 (installed here) has is_repeated and no
    # label; older releases may have label only.
    repeated = getattr(field, "is_repeated", None)
    if repeated is None:
        return bool(field.label == field.LABEL_REPEATED)
    return bool(repeated)
