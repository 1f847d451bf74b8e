"""The coordinator's state, and ``apply``: the only place it changes.

The state is the ``CoordinatorState`` message itself, so a snapshot is its
serialized form and replayed state compares with live state field by field.
``apply`` is the same code live and in replay: it reads nothing but the
state and the event, never the clock or the configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from coordinator import checkpoints, jobs, taskmanagers
from coordinator.errors import ReplayError
from protos import jobledger_events_pb2 as pb

logger = logging.getLogger(__name__)

Applier = Callable[..., None]


def _apply_leader_elected(
    state: pb.CoordinatorState, body: pb.LeaderElected, event: pb.Event
) -> None:
    state.epoch = body.epoch
    state.leader_id = body.leader_id
    state.leader_address = body.address
    state.leader_since_ms = event.timestamp.ToMilliseconds()


APPLIERS: dict[str, Applier] = {
    "leader_elected": _apply_leader_elected,
    **jobs.APPLIERS,
    **taskmanagers.APPLIERS,
    **checkpoints.APPLIERS,
}

_missing = {f.name for f in pb.Event.DESCRIPTOR.oneofs_by_name["body"].fields} - set(
    APPLIERS
)
if _missing:
    raise RuntimeError(f"event types without an apply function: {sorted(_missing)}")


def new_state() -> pb.CoordinatorState:
    """Return the state of an empty log."""
    return pb.CoordinatorState()


def apply(state: pb.CoordinatorState, event: pb.Event) -> None:
    """Change ``state`` by one event and record its seq.

    Raises ReplayError naming the event's seq and type when the event is of
    an unknown type or does not fit the state; the state may then be half
    changed and must be dropped.
    """
    name = event.WhichOneof("body")
    if name is None:
        raise ReplayError(event.seq, "none", "the event has no body")
    try:
        APPLIERS[name](state, getattr(event, name), event)
    except Exception as exc:
        raise ReplayError(event.seq, name, f"{type(exc).__name__}: {exc}") from exc
    state.applied_seq = event.seq


def apply_all(state: pb.CoordinatorState, events: Iterable[pb.Event]) -> int:
    """Apply events in order; return how many were applied."""
    count = 0
    for event in events:
        apply(state, event)
        count += 1
    return count
