"""The names of the built-in operators, shared by the worker and the coordinator.

This module imports nothing, so that the coordinator can validate operator
names at submission without loading the operators themselves.
"""

from __future__ import annotations

# Operator names in this namespace are reserved for the built-in operators.
BUILTIN_NAMESPACE = "jobledger."

SOURCE_NAMES: tuple[str, ...] = (
    "jobledger.source.csv",
    "jobledger.source.jsonl",
)

OPERATOR_NAMES: tuple[str, ...] = (
    "jobledger.map",
    "jobledger.filter",
    "jobledger.flat_map",
    "jobledger.aggregate",
    "jobledger.window.tumbling",
    "jobledger.sink.print",
    "jobledger.sink.file",
)
