"""The hot standby: a copy of the state kept current by following the log.

A standby applies every event the leader appends, with the same ``apply``
the leader uses, so when it takes over it only applies the few events it
has not seen yet instead of replaying the log from the newest snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from coordinator.errors import ReplayError
from coordinator.replay import replay
from coordinator.state import apply
from eventlog import CompactedError, EventLog, EventLogError
from protos import jobledger_events_pb2 as pb

logger = logging.getLogger(__name__)

# Seconds a follower waits before it rebuilds after a failed replay.
_RETRY_S = 1.0


class Follower:
    """Follows the log into ``state`` in the background, between ``start`` and
    ``take_over``."""

    def __init__(self, log: EventLog, coordinator_id: str) -> None:
        self._log = log
        self._coordinator_id = coordinator_id
        # None while the state is being rebuilt, or after a failed replay.
        self.state: pb.CoordinatorState | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def followed_seq(self) -> int:
        """The seq of the last event applied, or 0 while rebuilding."""
        return self.state.applied_seq if self.state is not None else 0

    def start(self) -> None:
        """Start following from a fresh replay. Safe to call twice."""
        if self._task is None or self._task.done():
            self.state = None
            self._task = asyncio.create_task(self._run(), name="follow the log")

    async def stop(self) -> None:
        """Stop following; ``state`` keeps what was applied. Safe to call twice."""
        task, self._task = self._task, None
        if task is None:
            return
        # On Python 3.11, asyncio.wait_for swallows a cancellation that
        # arrives as the awaited future completes, which ``follow`` may be
        # in, so the task is cancelled until it has ended.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        with contextlib.suppress(asyncio.CancelledError):
            task.result()

    async def take_over(self) -> pb.CoordinatorState:
        """Stop following and return the state with every event of the log.

        Call once this coordinator holds the lease, so nothing is appended
        meanwhile. Falls back to a full replay when the followed state is
        missing or the events it lacks were compacted away. Raises
        ReplayError or EventLogError when that replay fails too.
        """
        await self.stop()
        state, self.state = self.state, None
        if state is not None:
            try:
                applied = await _apply_from(self._log, state)
            except (CompactedError, ReplayError) as exc:
                logger.warning("catching up the followed state failed: %s", exc)
            else:
                logger.info(
                    "coordinator %s caught up %d events to seq %d",
                    self._coordinator_id,
                    applied,
                    state.applied_seq,
                )
                return state
        state, _ = await replay(self._log)
        return state

    async def _run(self) -> None:
        while True:
            try:
                self.state, _ = await replay(self._log)
                logger.info(
                    "coordinator %s follows the log from seq %d",
                    self._coordinator_id,
                    self.state.applied_seq,
                )
                async for event in self._log.follow(self.state.applied_seq + 1):
                    apply(self.state, event)
            except CompactedError as exc:
                # The leader compacted past this follower; start again from
                # the newer snapshot.
                logger.info(
                    "coordinator %s fell behind compaction: %s",
                    self._coordinator_id,
                    exc,
                )
                self.state = None
            except (ReplayError, EventLogError) as exc:
                logger.error(
                    "coordinator %s cannot follow the log: %s; retrying in %g s",
                    self._coordinator_id,
                    exc,
                    _RETRY_S,
                )
                self.state = None
                await asyncio.sleep(_RETRY_S)


async def _apply_from(log: EventLog, state: pb.CoordinatorState) -> int:
    """Apply the events after ``state.applied_seq`` to the end of the log."""
    count = 0
    async for event in log.read(state.applied_seq + 1):
        apply(state, event)
        count += 1
    return count
