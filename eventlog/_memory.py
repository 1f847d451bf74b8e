"""An event log in memory: the same contract as SQLite's, without durability.

For tests and for benchmarks that measure what durability costs. Events are
lost when the process ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence

from eventlog._base import (
    CompactedError,
    EventLog,
    FencedError,
    LeaderInfo,
    Lease,
    LogClosedError,
    StandbyInfo,
    event_type,
    now_ms,
)
from protos import jobledger_events_pb2 as pb


class MemoryEventLog(EventLog):
    """The event log in a Python list.

    Events yielded by ``read`` and ``follow`` are the stored messages
    themselves: callers must not change them.
    """

    def __init__(self) -> None:
        self._events: list[pb.Event] = []
        self._first_seq = 1
        self._snapshot: pb.Snapshot | None = None
        self._lease = LeaderInfo("", "", 0, 0)
        self._standbys: dict[str, StandbyInfo] = {}
        self._committed = asyncio.Condition()
        self._closed = False

    async def open(self) -> None:
        self._check_open()

    async def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosedError("in-memory event log is closed")

    async def append(self, events: Sequence[pb.Event], epoch: int) -> list[int]:
        self._check_open()
        if epoch != self._lease.epoch:
            raise FencedError(epoch, self._lease.epoch)
        for event in events:
            event_type(event)
        stamp = now_ms()
        seqs = [self._store(event, epoch, stamp) for event in events]
        async with self._committed:
            self._committed.notify_all()
        return seqs

    def _store(self, event: pb.Event, epoch: int, stamp: int) -> int:
        stored = pb.Event()
        stored.CopyFrom(event)
        stored.seq = self._first_seq + len(self._events)
        stored.epoch = epoch
        if not stored.HasField("timestamp"):
            stored.timestamp.FromMilliseconds(stamp)
        self._events.append(stored)
        return stored.seq

    async def read(self, from_seq: int = 1) -> AsyncIterator[pb.Event]:
        seq = self._start(from_seq)
        while (event := self._at(seq)) is not None:
            yield event
            seq += 1

    async def follow(self, from_seq: int = 1) -> AsyncIterator[pb.Event]:
        seq = self._start(from_seq)
        while True:
            while (event := self._at(seq)) is not None:
                yield event
                seq += 1
            async with self._committed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._committed.wait(), 1.0)

    def _start(self, from_seq: int) -> int:
        self._check_open()
        seq = max(from_seq, 1)
        if seq < self._first_seq:
            raise CompactedError(seq, self._first_seq - 1)
        return seq

    def _at(self, seq: int) -> pb.Event | None:
        """Return the event at ``seq``, None past the end; raise CompactedError
        when compaction deleted it meanwhile."""
        self._check_open()
        if seq < self._first_seq:
            raise CompactedError(seq, self._first_seq - 1)
        index = seq - self._first_seq
        return self._events[index] if index < len(self._events) else None

    async def last_seq(self) -> int:
        self._check_open()
        return self._first_seq + len(self._events) - 1

    async def save_snapshot(self, snapshot: pb.Snapshot) -> None:
        self._check_open()
        last = await self.last_seq()
        if snapshot.seq > last:
            raise ValueError(
                f"snapshot seq {snapshot.seq} is past the newest event seq {last}"
            )
        if self._snapshot is None or snapshot.seq >= self._snapshot.seq:
            self._snapshot = pb.Snapshot()
            self._snapshot.CopyFrom(snapshot)

    async def load_snapshot(self) -> pb.Snapshot | None:
        self._check_open()
        if self._snapshot is None:
            return None
        copy = pb.Snapshot()
        copy.CopyFrom(self._snapshot)
        return copy

    async def compact(self, keep_tail: int = 0) -> int:
        self._check_open()
        if keep_tail < 0:
            raise ValueError(f"keep_tail must be 0 or more, got {keep_tail}")
        if self._snapshot is None:
            return 0
        through = self._snapshot.seq - keep_tail
        count = max(0, through - self._first_seq + 1)
        del self._events[:count]
        self._first_seq += count
        return count

    async def acquire_lease(
        self, holder: str, address: str, duration_s: float
    ) -> Lease | None:
        self._check_open()
        if not holder:
            raise ValueError("lease holder must not be empty")
        now = now_ms()
        current = self._lease
        if current.holder and current.holder != holder and current.expires_ms > now:
            return None
        lease = Lease(holder, current.epoch + 1, now + int(duration_s * 1000))
        self._lease = LeaderInfo(holder, address, lease.epoch, lease.expires_ms)
        elected = pb.Event()
        elected.leader_elected.leader_id = holder
        elected.leader_elected.address = address
        elected.leader_elected.epoch = lease.epoch
        await self.append([elected], lease.epoch)
        return lease

    async def renew_lease(self, lease: Lease, duration_s: float) -> Lease | None:
        self._check_open()
        current = self._lease
        if current.holder != lease.holder or current.epoch != lease.epoch:
            return None
        expires = now_ms() + int(duration_s * 1000)
        self._lease = dataclasses.replace(current, expires_ms=expires)
        return dataclasses.replace(lease, expires_ms=expires)

    async def release_lease(self, lease: Lease) -> None:
        self._check_open()
        current = self._lease
        if current.holder == lease.holder and current.epoch == lease.epoch:
            self._lease = dataclasses.replace(current, holder="", expires_ms=0)

    async def leader(self) -> LeaderInfo:
        self._check_open()
        return self._lease

    async def report_standby(
        self, coordinator_id: str, address: str, followed_seq: int
    ) -> None:
        self._check_open()
        self._standbys[coordinator_id] = StandbyInfo(
            coordinator_id, address, followed_seq, now_ms()
        )

    async def forget_standby(self, coordinator_id: str) -> None:
        self._check_open()
        self._standbys.pop(coordinator_id, None)

    async def standbys(self) -> list[StandbyInfo]:
        self._check_open()
        return [self._standbys[key] for key in sorted(self._standbys)]
