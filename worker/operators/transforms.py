"""Stateless transformations over user functions, and the keyed aggregation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from worker.operators.base import (
    ConfigError,
    Operator,
    OperatorContext,
    Output,
    key_selector,
    load_function,
    optional,
    required,
)
from worker.records import Record, key_text


class MapOperator(Operator):
    """Replaces each value by ``function(value)``; config ``function``."""

    def __init__(self, config: dict[str, Any], context: OperatorContext) -> None:
        super().__init__(config, context)
        self.function = load_function(required(config, "function", str), "function")

    def process(self, record: Record, output: Output) -> None:
        output.emit(Record(self.function(record.value), record.timestamp))


class FilterOperator(Operator):
    """Keeps the values for which ``function(value)`` is true."""

    def __init__(self, config: dict[str, Any], context: OperatorContext) -> None:
        super().__init__(config, context)
        self.function = load_function(required(config, "function", str), "function")

    def process(self, record: Record, output: Output) -> None:
        if self.function(record.value):
            output.emit(record)


class FlatMapOperator(Operator):
    """Emits every value of the iterable ``function(value)`` returns."""

    def __init__(self, config: dict[str, Any], context: OperatorContext) -> None:
        super().__init__(config, context)
        self.function = load_function(required(config, "function", str), "function")

    def process(self, record: Record, output: Output) -> None:
        for value in self.function(record.value):
            output.emit(Record(value, record.timestamp))


def _reducer(name: str) -> Callable[[Any, Any], Any]:
    builtin: dict[str, Callable[[Any, Any], Any]] = {
        "sum": lambda acc, x: x if acc is None else acc + x,
        "min": lambda acc, x: x if acc is None else min(acc, x),
        "max": lambda acc, x: x if acc is None else max(acc, x),
        "count": lambda acc, x: 1 if acc is None else acc + 1,
    }
    if name in builtin:
        return builtin[name]
    if ":" in name:
        return load_function(name, "aggregate")
    raise ConfigError(
        f"aggregate {name!r} is unknown; give sum, min, max, count or module:function"
    )


class KeyedAggregate:
    """The per-key accumulation shared by the aggregation and the window.

    Configuration:

    - ``key``: a field or module:function, by default the key selector of
      the HASH input edge.
    - ``aggregate``: sum, min, max, count, or a ``module:function`` that takes
      the accumulator (None at first) and the input.
    - ``field``: the field of the value to aggregate, by default the value.
    """

    def __init__(self, config: dict[str, Any], context: OperatorContext) -> None:
        spec = optional(config, "key", str, "") or context.input_key_selector
        self.key_of = key_selector(spec, "key")
        self.reduce = _reducer(optional(config, "aggregate", str, "count"))
        self.field: str | None = optional(config, "field", str, None)

    def input_of(self, value: Any) -> Any:
        if self.field is None:
            return value
        if not isinstance(value, dict) or self.field not in value:
            raise KeyError(
                f"record has no field {self.field!r} to aggregate: {value!r}"
            )
        return value[self.field]


class AggregateOperator(Operator):
    """A rolling aggregation per key: emits ``{"key", "value"}`` per input.

    The accumulators are keyed state, snapshotted at every barrier. Keys are
    stored as JSON values, so a key must be a JSON value too.
    """

    def __init__(self, config: dict[str, Any], context: OperatorContext) -> None:
        super().__init__(config, context)
        self.aggregate = KeyedAggregate(config, context)
        self.state: dict[str, tuple[Any, Any]] = {}

    def process(self, record: Record, output: Output) -> None:
        key = self.aggregate.key_of(record.value)
        slot = _state_key(key)
        previous = self.state.get(slot, (key, None))[1]
        value = self.aggregate.reduce(previous, self.aggregate.input_of(record.value))
        self.state[slot] = (key, value)
        output.emit(Record({"key": key, "value": value}, record.timestamp))

    def snapshot_state(self, checkpoint_id: int) -> Any:
        return [[key, value] for key, value in self.state.values()]

    def restore_state(self, state: Any) -> None:
        self.state = {_state_key(key): (key, value) for key, value in state or []}


def _state_key(key: Any) -> str:
    return key_text(key)
