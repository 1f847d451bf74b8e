"""Rebuilding the coordinator's state from the log."""

from __future__ import annotations

import dataclasses
import logging
import time

from coordinator.state import apply, new_state
from eventlog import EventLog
from observability import instruments
from protos import jobledger_events_pb2 as pb

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ReplayStats:
    """What a replay read, for the start-up log line."""

    snapshot_seq: int
    events: int
    elapsed_ms: float


async def replay(log: EventLog) -> tuple[pb.CoordinatorState, ReplayStats]:
    """Load the newest snapshot and apply every event after it.

    Raises ReplayError naming the seq and type of an event that cannot be
    applied, and EventDecodeError for one that cannot be decoded: a partial
    state is never returned.
    """
    started = time.perf_counter()
    snapshot = await log.load_snapshot()
    state = new_state()
    snapshot_seq = 0
    if snapshot is not None:
        state.CopyFrom(snapshot.state)
        snapshot_seq = snapshot.seq
    count = 0
    async for event in log.read(state.applied_seq + 1):
        apply(state, event)
        count += 1
    stats = ReplayStats(snapshot_seq, count, (time.perf_counter() - started) * 1000)
    instruments.replay_duration.record(stats.elapsed_ms / 1000)
    logger.info(
        "replayed %d events after snapshot seq %d in %.0f ms: %d jobs, "
        "%d task managers, %d checkpoints, last seq %d",
        count,
        snapshot_seq,
        stats.elapsed_ms,
        len(state.jobs),
        len(state.task_managers),
        len(state.checkpoints),
        state.applied_seq,
    )
    return state, stats
