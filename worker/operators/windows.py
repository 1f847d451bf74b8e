"""The event-time tumbling window, driven by watermarks."""

from __future__ import annotations

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
from worker.records import Record

logger = logging.getLogger(__name__)


class TumblingWindowOperator(Operator):
    """Aggregates per key and per window ``[start, start + size_ms)``.

    Configuration: ``size_ms``, ``allowed_lateness_ms`` (default 0) and the
    keys of KeyedAggregate. A window fires once the watermark reaches its
    last millisecond, emitting ``{"key", "window_start", "window_end",
    "value"}``. Its state is kept for the allowed lateness after that, and
    each late record within it updates the window and fires it again with
    the new value. Records later than that are dropped and counted.
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
        # (repr of key, window start) -> [key, start, accumulator, fired]
        self.windows: dict[tuple[str, int], list[Any]] = {}
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
        window = self.windows.setdefault((repr(key), start), [key, start, None, False])
        window[2] = self.aggregate.reduce(
            window[2], self.aggregate.input_of(record.value)
        )
        if window[3]:
            # A late record within the allowed lateness fires the window again.
            self._fire(window, output)

    def on_watermark(self, timestamp: int, output: Output) -> None:
        self.watermark = timestamp
        for slot, window in sorted(self.windows.items(), key=lambda item: item[0][1]):
            end = window[1] + self.size_ms
            if not window[3] and end - 1 <= timestamp:
                window[3] = True
                self._fire(window, output)
            if self._expired(window[1]):
                del self.windows[slot]
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
        self.windows = {(repr(w[0]), w[1]): list(w) for w in state["windows"]}
        self.watermark = state["watermark"]
        self.dropped = state["dropped"]
