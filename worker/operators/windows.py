"""The event-time tumbling window, driven by watermarks."""

from __future__ import annotations

import heapq
import logging
from typing import Any

from worker.operators.base import (
    ConfigError,
    Operator,
    OperatorContext,
    Output,
    optional,
    required,
)
from worker.operators.transforms import KeyedAggregate
from worker.records import Record, key_text

logger = logging.getLogger(__name__)


class TumblingWindowOperator(Operator):
    """Aggregates per key and per window ``[start, start + size_ms)``.

    Configuration: ``size_ms``, ``allowed_lateness_ms`` (default 0) and the
    keys of KeyedAggregate. A window fires once the watermark reaches its
    last millisecond, emitting ``{"key", "window_start", "window_end",
    "value"}``. Its state is kept for the allowed lateness after that, and
    each late record within it updates the window and fires it again with
    the new value (a late record that opens a window fires it at once).
    Records later than that are dropped and counted.

    Windows wait in two heaps ordered by start, one until they fire and one
    until they expire, so a watermark costs O(log n) per window it fires or
    expires rather than a pass over every window.
    """

    def __init__(self, config: dict[str, Any], context: OperatorContext) -> None:
        super().__init__(config, context)
        self.size_ms: int = required(config, "size_ms", int)
        self.lateness_ms: int = optional(config, "allowed_lateness_ms", int, 0)
        if self.size_ms <= 0:
            raise ConfigError(f"size_ms {self.size_ms} must be positive")
        if self.lateness_ms < 0:
            raise ConfigError(f"allowed_lateness_ms {self.lateness_ms} is negative")
        self.aggregate = KeyedAggregate(config, context)
        # (key_text of key, window start) -> [key, start, accumulator, fired]
        self.windows: dict[tuple[str, int], list[Any]] = {}
        self._to_fire: list[tuple[int, tuple[str, int]]] = []
        self._to_expire: list[tuple[int, tuple[str, int]]] = []
        self.watermark: int | None = None
        self.dropped = 0

    def process(self, record: Record, output: Output) -> None:
        if record.timestamp is None:
            raise ValueError(
                f"window of task {self.context.task_id} got a record without an "
                "event time; set timestamp_field on the source"
            )
        start = record.timestamp - record.timestamp % self.size_ms
        if self._expired(start):
            self.dropped += 1
            logger.debug("task %s dropped a record too late", self.context.task_id)
            return
        key = self.aggregate.key_of(record.value)
        slot = (key_text(key), start)
        window = self.windows.get(slot)
        if window is None:
            window = self._open_window(slot, key, start)
        window[2] = self.aggregate.reduce(
            window[2], self.aggregate.input_of(record.value)
        )
        if window[3]:
            # A late record within the allowed lateness fires the window again.
            self._fire(window, output)
        elif self.watermark is not None and start + self.size_ms - 1 <= self.watermark:
            window[3] = True
            self._fire(window, output)

    def _open_window(self, slot: tuple[str, int], key: Any, start: int) -> list[Any]:
        window = [key, start, None, False]
        self.windows[slot] = window
        heapq.heappush(self._to_fire, (start, slot))
        heapq.heappush(self._to_expire, (start, slot))
        return window

    def on_watermark(self, timestamp: int, output: Output) -> None:
        self.watermark = timestamp
        # A window fires when the watermark reaches its last millisecond.
        while self._to_fire and self._to_fire[0][0] + self.size_ms - 1 <= timestamp:
            _, slot = heapq.heappop(self._to_fire)
            window = self.windows.get(slot)
            if window is not None and not window[3]:
                window[3] = True
                self._fire(window, output)
        while self._to_expire and self._expired(self._to_expire[0][0]):
            _, slot = heapq.heappop(self._to_expire)
            self.windows.pop(slot, None)
        output.emit_watermark(timestamp)

    def _expired(self, start: int) -> bool:
        if self.watermark is None:
            return False
        return start + self.size_ms - 1 + self.lateness_ms < self.watermark

    def _fire(self, window: list[Any], output: Output) -> None:
        key, start, value = window[0], window[1], window[2]
        end = start + self.size_ms
        result = {"key": key, "window_start": start, "window_end": end, "value": value}
        output.emit(Record(result, end - 1))

    def snapshot_state(self, checkpoint_id: int) -> Any:
        return {
            "windows": list(self.windows.values()),
            "watermark": self.watermark,
            "dropped": self.dropped,
        }

    def restore_state(self, state: Any) -> None:
        self.windows = {(key_text(w[0]), w[1]): list(w) for w in state["windows"]}
        self._to_expire = sorted((slot[1], slot) for slot in self.windows)
        self._to_fire = [
            (slot[1], slot) for slot, window in self.windows.items() if not window[3]
        ]
        heapq.heapify(self._to_fire)
        self.watermark = state["watermark"]
        self.dropped = state["dropped"]
