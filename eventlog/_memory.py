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
        stamp = now_ms()
        seqs = [self._store(event, epoch, stamp) for event in events]
        async with self._committed:
            self._committed.notify_all()
        return seqs

    def _store(self, event: pb.Event, epoch: int, stamp: int) -> int:
        event_type(event)
        stored = pb.Event()
        stored.CopyFrom(event)
        stored.seq = self._first_seq + len(self._events)
        stored.epoch = epoch
        if not stored.HasField("timestamp"):
            stored.timestamp.FromMilliseconds(stamp)
        self._events.append(stored)
        return stored.seq

    async def read(self, from_seq: int = 1) -> AsyncIterator[pb.Event]:
        index = self._index(from_seq)
        while index < len(self._events):
            yield self._events[index]
            index += 1

    async def follow(self, from_seq: int = 1) -> AsyncIterator[pb.Event]:
        index = self._index(from_seq)
        while True:
            while index < len(self._events):
                yield self._events[index]
                index += 1
            async with self._committed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._committed.wait(), 1.0)

    def _index(self, from_seq: int) -> int:
        self._check_open()
        if from_seq < self._first_seq and self._first_seq > 1:
            raise CompactedError(from_seq, self._first_seq - 1)
        return max(from_seq, 1) - self._first_seq

    async def last_seq(self) -> int:
        return self._first_seq + len(self._events) - 1

    async def save_snapshot(self, snapshot: pb.Snapshot) -> None:
        last = await self.last_seq()
        if snapshot.seq > last:
            raise ValueError(
                f"snapshot seq {snapshot.seq} is past the newest event seq {last}"
            )
        if self._snapshot is None or snapshot.seq >= self._snapshot.seq:
            self._snapshot = pb.Snapshot()
            self._snapshot.CopyFrom(snapshot)

    async def load_snapshot(self) -> pb.Snapshot | None:
        if self._snapshot is None:
            return None
        copy = pb.Snapshot()
        copy.CopyFrom(self._snapshot)
        return copy

    async def compact(self, keep_tail: int = 0) -> int:
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
        current = self._lease
        if current.holder != lease.holder or current.epoch != lease.epoch:
            return None
        expires = now_ms() + int(duration_s * 1000)
        self._lease = dataclasses.replace(current, expires_ms=expires)
        return dataclasses.replace(lease, expires_ms=expires)

    async def release_lease(self, lease: Lease) -> None:
        current = self._lease
        if current.holder == lease.holder and current.epoch == lease.epoch:
            self._lease = dataclasses.replace(current, holder="", expires_ms=0)

    async def leader(self) -> LeaderInfo:
        return self._lease
