"""The operator interface and the helpers that operators share."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, Protocol

from worker.records import Record


class ConfigError(ValueError):
    """An operator's configuration is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True, slots=True)
class OperatorContext:
    """The placement of an operator instance: job, vertex, subtask, attempt.

    ``input_key_selector`` is the key selector of the task's HASH input
    edge, or "" when the input is not keyed.
    """

    job_id: str
    vertex_id: str
    subtask_index: int
    parallelism: int
    attempt: int
    input_key_selector: str = ""

    @property
    def task_id(self) -> str:
        return f"{self.vertex_id}_{self.subtask_index}"


class Output(Protocol):
    """The destination of the records and watermarks an operator emits."""

    def emit(self, record: Record) -> None: ...

    def emit_watermark(self, timestamp: int) -> None: ...


class Operator:
    """A one-input operator. Calls arrive one at a time from the task's loop.

    Subclasses validate their configuration in ``__init__`` and raise
    ConfigError. State returned by ``snapshot_state`` must be JSON
    serializable; ``restore_state`` receives it back after a recovery,
    before the first record.
    """

    def __init__(self, config: dict[str, Any], context: OperatorContext) -> None:
        self.config = config
        self.context = context

    def open(self) -> None:
        """Prepare to process; called once before the first element."""

    def process(self, record: Record, output: Output) -> None:
        raise NotImplementedError

    def on_watermark(self, timestamp: int, output: Output) -> None:
        """React to the task's event time advancing; forwards by default."""
        output.emit_watermark(timestamp)

    def snapshot_state(self, checkpoint_id: int) -> Any:
        """Return the state at a barrier; None for a stateless operator."""
        return None

    def restore_state(self, state: Any) -> None:
        """Take back what ``snapshot_state`` returned."""

    def finish(self, output: Output) -> None:
        """React to the end of every input, before the task finishes."""

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        """React to a checkpoint that completed; may run after ``finish``."""

    def notify_checkpoint_aborted(self, checkpoint_id: int) -> None:
        """React to a checkpoint that was aborted."""

    def close(self) -> None:
        """Release resources; safe to call twice and after a failure."""


def load_function(spec: str, field: str) -> Callable[..., Any]:
    """Import ``module:function``; raise ConfigError naming ``field``."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            f"{field} {spec!r} is invalid; give it as module:function, "
            "for example 'examples.words:split'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{field} {spec!r}: cannot import {module_name}: {exc}"
        ) from exc
    except Exception as exc:
        # The module's own code failed while it was imported.
        raise ConfigError(
            f"{field} {spec!r}: importing {module_name} failed: {exc!r}"
        ) from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(
            f"{field} {spec!r}: {module_name} has no function {attribute}"
        )
    return function  # type: ignore[no-any-return]


def key_selector(spec: str, field: str) -> Callable[[Any], Any]:
    """Build a key selector from a field name or ``module:function``."""
    if not spec:
        raise ConfigError(f"{field} is missing; give a field name or module:function")
    if ":" in spec:
        return load_function(spec, field)
    name = spec

    def select(value: Any) -> Any:
        if not isinstance(value, dict) or name not in value:
            raise KeyError(f"record has no field {name!r} to key by: {value!r}")
        return value[name]

    return select


def required(config: dict[str, Any], name: str, kind: type) -> Any:
    """Return ``config[name]``, raising ConfigError when missing or mistyped."""
    if name not in config:
        raise ConfigError(f"configuration field {name!r} is missing")
    return optional(config, name, kind, None)


def optional(config: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """Return ``config[name]`` or ``default``; raise ConfigError when mistyped."""
    value = config.get(name, default)
    if value is default:
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        # Protobuf Struct turns every JSON number into a double.
        value = int(value)
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"configuration field {name!r} must be of type {kind.__name__}, "
            f"not {type(value).__name__}"
        )
    return value
