"""A task's inputs: reading its channels, aligning barriers, merging watermarks."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence

from worker.exchange import ChannelBroken, InputChannel
from worker.records import Barrier, Element, EndOfInput, Record, Watermark


class InputGate:
    """Reads the input channels of one task in turn, as one stream of elements.

    Barriers are aligned (exactly-once): once a channel delivers the barrier
    of checkpoint N, it is blocked until every other live channel has
    delivered it too, and only then does ``next`` return the barrier, once.
    A newer barrier arriving during an alignment abandons the older one, the
    way Flink does when a checkpoint is subsumed. Watermarks are merged: the
    gate returns a Watermark when the minimum over the live channels
    advances. ``next`` returns None when every channel has ended.
    """

    def __init__(self, channels: Sequence[InputChannel]) -> None:
        self.channels = list(channels)
        self._current: list[collections.deque[Element]] = [
            collections.deque() for _ in self.channels
        ]
        self._ended: set[int] = set()
        self._blocked: set[int] = set()
        self._aligning: Barrier | None = None
        self._watermarks: list[int | None] = [None] * len(self.channels)
        self._emitted_watermark: int | None = None
        self._turn = 0
        # Wall-clock time the first barrier of the latest alignment arrived.
        self.alignment_started_ns = 0
        # The channel read last, whose rest of a buffer in ``_current`` is
        # checked first, or -1.
        self._last = -1
        # Elements released together, e.g. a barrier and a watermark when a
        # channel ends; returned before anything else is read.
        self._released: collections.deque[Element] = collections.deque()

    def has_data(self) -> bool:
        """Tell whether ``next`` can return without waiting."""
        if self._released:
            return True
        index = self._last
        if index >= 0 and self._current[index] and index not in self._blocked:
            return True
        return any(
            self._current[i] or self.channels[i].buffers or self.channels[i].failure
            for i in self._readable()
        )

    async def next(self) -> Element | None:
        """Return the next element for the operators; raise ChannelBroken."""
        # Fast path: the rest of the buffer taken last, while its channel may
        # still be read. Channels thus take turns buffer by buffer.
        index = self._last
        if index >= 0 and not self._released and index not in self._blocked:
            current = self._current[index]
            if current and type(current[0]) is Record:
                return current.popleft()
        while True:
            if self._released:
                return self._released.popleft()
            picked = self._pick()
            if picked is not None:
                index, element = picked
                result = self._handle(index, element)
                if result is not None:
                    return result
                continue
            if len(self._ended) == len(self.channels):
                return None
            await self._wait()

    def _readable(self) -> list[int]:
        count = len(self.channels)
        order = [(self._turn + step) % count for step in range(count)]
        return [i for i in order if i not in self._ended and i not in self._blocked]

    def _pick(self) -> tuple[int, Element] | None:
        for index in self._readable():
            channel = self.channels[index]
            if channel.failure is not None:
                raise ChannelBroken(
                    f"input from {channel.key.source_vertex_id}_"
                    f"{channel.key.source_subtask_index} broke: {channel.failure}"
                )
            current = self._current[index]
            if not current:
                buffer = channel.take()
                if buffer is None:
                    continue
                current.extend(buffer)
            self._turn = (index + 1) % len(self.channels)
            self._last = index
            return index, current.popleft()
        return None

    async def _wait(self) -> None:
        readable = [self.channels[i] for i in self._readable()]
        for channel in readable:
            channel.data_available.clear()
        if self.has_data():
            return
        events = [channel.data_available.wait() for channel in readable]
        if not events:
            raise RuntimeError("input gate has nothing to wait for")
        waiters = [asyncio.ensure_future(event) for event in events]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _handle(self, index: int, element: Element) -> Element | None:
        if isinstance(element, Barrier):
            return self._on_barrier(index, element)
        if isinstance(element, Watermark):
            self._watermarks[index] = element.timestamp
            return self._merged_watermark()
        if isinstance(element, EndOfInput):
            self._ended.add(index)
            self._blocked.discard(index)
            for released in (self._complete_alignment(), self._merged_watermark()):
                if released is not None:
                    self._released.append(released)
            return None
        return element

    def _on_barrier(self, index: int, barrier: Barrier) -> Element | None:
        aligning = self._aligning
        if aligning is not None and barrier.checkpoint_id < aligning.checkpoint_id:
            return None
        if aligning is None or barrier.checkpoint_id > aligning.checkpoint_id:
            self._blocked.clear()
            self._aligning = barrier
            self.alignment_started_ns = time.time_ns()
        self._blocked.add(index)
        return self._complete_alignment()

    def _complete_alignment(self) -> Barrier | None:
        barrier = self._aligning
        if barrier is None:
            return None
        live = set(range(len(self.channels))) - self._ended
        if not live <= self._blocked:
            return None
        self._aligning = None
        self._blocked.clear()
        return barrier

    def _merged_watermark(self) -> Watermark | None:
        live = [
            self._watermarks[i]
            for i in range(len(self.channels))
            if i not in self._ended
        ]
        if not live:
            # Every input ended: the sources sent their final watermark already.
            return None
        if any(mark is None for mark in live):
            return None
        merged = min(mark for mark in live if mark is not None)
        if self._emitted_watermark is not None and merged <= self._emitted_watermark:
            return None
        self._emitted_watermark = merged
        return Watermark(merged)

    @property
    def aligning(self) -> bool:
        return self._aligning is not None


__all__ = ["ChannelBroken", "InputGate"]
