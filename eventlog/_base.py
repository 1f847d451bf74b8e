"""The event log interface, its value types and its errors."""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from types import TracebackType
from typing import Self

from protos import jobledger_events_pb2 as pb


class EventLogError(Exception):
    """Base of every error the event log raises."""


class LogOpenError(EventLogError):
    """The file is not a jobledger log, or one of an unsupported version."""


class LogClosedError(EventLogError):
    """The log was used after ``close()``."""


class FencedError(EventLogError):
    """An append or lease renewal named an epoch that no longer leads.

    Nothing of the rejected batch was written.
    """

    def __init__(self, writer_epoch: int, log_epoch: int) -> None:
        super().__init__(
            f"append fenced: writer epoch {writer_epoch} is not the log's "
            f"leader epoch {log_epoch}; this coordinator is no longer the leader"
        )
        self.writer_epoch = writer_epoch
        self.log_epoch = log_epoch


class AppendError(EventLogError):
    """A batch could not be committed; none of its events is durable."""


class EventDecodeError(EventLogError):
    """A stored event could not be decoded. Replay must stop here."""

    def __init__(self, seq: int, event_type: str, reason: str) -> None:
        super().__init__(
            f"cannot decode event seq {seq} of type {event_type!r}: {reason}"
        )
        self.seq = seq
        self.event_type = event_type


class CompactedError(EventLogError):
    """The requested events were deleted by compaction; load a snapshot."""

    def __init__(self, from_seq: int, compacted_through: int) -> None:
        super().__init__(
            f"events from seq {from_seq} are gone: compaction deleted every event "
            f"up to seq {compacted_through}; start from the newest snapshot"
        )
        self.from_seq = from_seq
        self.compacted_through = compacted_through


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """A leadership lease held by one coordinator."""

    holder: str
    epoch: int
    expires_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class LeaderInfo:
    """The lease as stored: who leads, at which epoch, until when.

    ``holder`` is empty when no coordinator has taken the lease yet or the
    last leader released it.
    """

    holder: str
    address: str
    epoch: int
    expires_ms: int

    def is_live(self, now_ms: int) -> bool:
        """Return whether a holder exists and its lease has not expired."""
        return bool(self.holder) and self.expires_ms > now_ms


@dataclasses.dataclass(frozen=True, slots=True)
class StandbyInfo:
    """A standby coordinator's latest report of how far it followed the log."""

    coordinator_id: str
    address: str
    followed_seq: int
    # Wall-clock milliseconds of the report; a standby that stopped reporting
    # is presumed gone.
    reported_ms: int


def now_ms() -> int:
    """Return wall-clock milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def event_type(event: pb.Event) -> str:
    """Return the name of the event's body field, or raise ValueError."""
    name = event.WhichOneof("body")
    if name is None:
        raise ValueError("event has no body; set exactly one of Event's body fields")
    return name


class EventLog(abc.ABC):
    """A durable, fenced, append-only log of events, with snapshots and a lease.

    Appends land only when the writer's epoch is the log's leader epoch, in
    the same transaction as the write, so a deposed leader cannot write
    however late it wakes up. Sequence numbers start at 1, grow by one per
    event and are never reused, compaction included.

    Use as an async context manager, or call ``open()`` and ``close()``.
    """

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None:
        """Open the log, creating it if it does not exist.

        Raises LogOpenError for a file that is not a jobledger log or has an
        unsupported schema version.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the log. Safe to call twice.

        Appends already waiting are committed first; appends made after
        ``close`` began raise LogClosedError.
        """

    @abc.abstractmethod
    def append(self, events: Sequence[pb.Event], epoch: int) -> Awaitable[list[int]]:
        """Append a batch atomically; awaiting the result gives its sequence numbers.

        The result is ready only once the batch is durable. Each event needs
        a body; the log sets ``seq`` and ``epoch`` and, when unset,
        ``timestamp`` (the caller's messages are not changed). Awaiting
        raises FencedError, writing nothing, when ``epoch`` is not the log's
        leader epoch, and AppendError when the commit fails.

        A log may queue the batch as soon as ``append`` is called, and may
        raise an error it finds at once (a closed log) from the call itself.
        Use ``asyncio.ensure_future``, not ``create_task``, to run an append
        in the background.
        """

    @abc.abstractmethod
    def read(self, from_seq: int = 1) -> AsyncIterator[pb.Event]:
        """Yield the committed events with ``seq >= from_seq``, in order, then stop.

        Raises CompactedError when compaction deleted events at ``from_seq``
        and EventDecodeError for an event that cannot be decoded.
        """

    @abc.abstractmethod
    def follow(self, from_seq: int = 1) -> AsyncIterator[pb.Event]:
        """Yield events like ``read``, then every new event as it commits.

        Also sees events that another process appends to the same log.
        Never ends by itself; cancel the iteration to stop it.
        """

    @abc.abstractmethod
    async def last_seq(self) -> int:
        """Return the seq of the newest event, or 0 for an empty log."""

    @abc.abstractmethod
    async def save_snapshot(self, snapshot: pb.Snapshot) -> None:
        """Store a snapshot of the state as of ``snapshot.seq``.

        Raises ValueError when ``snapshot.seq`` is past the newest event.
        """

    @abc.abstractmethod
    async def load_snapshot(self) -> pb.Snapshot | None:
        """Return the newest snapshot, or None when there is none."""

    @abc.abstractmethod
    async def compact(self, keep_tail: int = 0) -> int:
        """Delete the events covered by the newest snapshot and older snapshots.

        Keeps the last ``keep_tail`` covered events for inspection. Returns
        how many events were deleted.
        """

    @abc.abstractmethod
    async def acquire_lease(
        self, holder: str, address: str, duration_s: float
    ) -> Lease | None:
        """Take the leadership lease if it is free, expired or already ours.

        Taking it increments the epoch and appends a LeaderElected event in
        the same transaction. Returns None, writing nothing, when another
        holder's lease is still live.
        """

    @abc.abstractmethod
    async def renew_lease(self, lease: Lease, duration_s: float) -> Lease | None:
        """Extend a lease we hold; return None when it was taken over."""

    @abc.abstractmethod
    async def release_lease(self, lease: Lease) -> None:
        """Give the lease up so a standby can take it at once.

        Does nothing when the lease was already taken over.
        """

    @abc.abstractmethod
    async def leader(self) -> LeaderInfo:
        """Return the lease as currently stored."""

    @abc.abstractmethod
    async def report_standby(
        self, coordinator_id: str, address: str, followed_seq: int
    ) -> None:
        """Record that a standby has applied the log up to ``followed_seq``.

        Standbys cannot append events, so their positions are kept beside
        the lease, one row per coordinator, overwritten by each report.
        """

    @abc.abstractmethod
    async def forget_standby(self, coordinator_id: str) -> None:
        """Remove a coordinator's standby report, e.g. once it leads or stops."""

    @abc.abstractmethod
    async def standbys(self) -> list[StandbyInfo]:
        """Return every standby report, ordered by coordinator id."""
