"""What deciding works with and returns: the context, decisions and effects."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from coordinator.config import CoordinatorConfig
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobmanager_internal_pb2 as fpb


@dataclasses.dataclass(slots=True)
class Context:
    """The state a decision reads, with the time and randomness it may use.

    Deciding never changes ``state``; whatever a decision draws from the
    clock or ``rng`` goes into its events, so replay never draws again.
    """

    state: pb.CoordinatorState
    config: CoordinatorConfig
    now_ms: int
    rng: random.Random


def event(**body: Any) -> pb.Event:
    """Build an envelope around one body, e.g. ``event(job_submitted=msg)``."""
    return pb.Event(**body)


# ------------------------------------------------------------------ effects
# Calls to workers, made once the events that call for them are durable.
# Each names the registration it was decided for, so that a call that finds
# the worker unreachable ends that registration and never a newer one.


@dataclasses.dataclass(frozen=True, slots=True)
class DeployTask:
    task_manager_id: str
    endpoint: str
    job_id: str
    task_id: str
    attempt: int
    descriptor: fpb.TaskDeploymentDescriptor
    registration_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class TriggerCheckpoint:
    task_manager_id: str
    endpoint: str
    request: fpb.TriggerCheckpointRequest
    registration_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class NotifyCheckpointComplete:
    task_manager_id: str
    endpoint: str
    request: svc.NotifyCheckpointCompleteRequest
    registration_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class NotifyCheckpointAborted:
    task_manager_id: str
    endpoint: str
    request: svc.NotifyCheckpointAbortedRequest
    registration_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class CancelTask:
    task_manager_id: str
    endpoint: str
    request: svc.CancelTaskRequest
    registration_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class DiscardSnapshots:
    task_manager_id: str
    endpoint: str
    request: svc.DiscardSnapshotsRequest
    registration_id: int


Effect = (
    DeployTask
    | TriggerCheckpoint
    | NotifyCheckpointComplete
    | NotifyCheckpointAborted
    | CancelTask
    | DiscardSnapshots
)


@dataclasses.dataclass(slots=True)
class Decision:
    """The events a command decided, the reply its caller gets, and effects.

    ``effects`` are calls that follow from the command itself rather than
    from an event, such as releasing the state handle of a late
    acknowledgement; they run once the decision's events are durable.
    """

    events: list[pb.Event] = dataclasses.field(default_factory=list)
    reply: Any = None
    effects: list[Effect] = dataclasses.field(default_factory=list)


def registration_of(state: pb.CoordinatorState, task_manager_id: str) -> int:
    """Return the current registration id of a task manager, or 0 when unknown."""
    tm = state.task_managers.get(task_manager_id)
    return tm.registration_id if tm is not None else 0


def endpoint_of(state: pb.CoordinatorState, task_manager_id: str) -> str:
    """Return "host:port" of a task manager, or "" when it is unknown."""
    tm = state.task_managers.get(task_manager_id)
    if tm is None:
        return ""
    return f"{tm.address}:{tm.port}"
