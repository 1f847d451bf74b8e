"""The operators a task runs, by ``fully_qualified_operator_name``.

Each operator takes a JSON object as its configuration (the descriptor's
``operator_configuration``). Functions are named ``module:function`` and
must be importable on the worker.

=========================  ====================================================
name                       what it does
=========================  ====================================================
``jobledger.source.csv``   CSV file with a header; row i goes to subtask
                           i % parallelism; resumable at a row offset
``jobledger.source.jsonl`` the same for a file of JSON lines
``jobledger.map``          ``function(value)`` replaces each value
``jobledger.filter``       keeps values for which ``function(value)`` is true
``jobledger.flat_map``     emits each item of ``function(value)``
``jobledger.aggregate``    rolling aggregation per key (keyed state)
``jobledger.window.tumbling``  event-time tumbling window per key, with
                           allowed lateness and one firing per late record
``jobledger.sink.print``   JSON lines on standard output
``jobledger.sink.file``    exactly-once JSON-lines file, append or upsert
=========================  ====================================================

Keying is a property of the edge: a HASH edge's key selector (a field name
or ``module:function``) partitions the records among the downstream
subtasks, and the keyed operators default to that selector.
"""

from __future__ import annotations

from typing import Any

from worker.operators.base import ConfigError, Operator, OperatorContext
from worker.operators.names import OPERATOR_NAMES, SOURCE_NAMES
from worker.operators.sinks import FileSink, PrintSink
from worker.operators.sources import CsvSource, FileSource, JsonLinesSource
from worker.operators.transforms import (
    AggregateOperator,
    FilterOperator,
    FlatMapOperator,
    MapOperator,
)
from worker.operators.windows import TumblingWindowOperator

SOURCES: dict[str, type[FileSource]] = {
    "jobledger.source.csv": CsvSource,
    "jobledger.source.jsonl": JsonLinesSource,
}

OPERATORS: dict[str, type[Operator]] = {
    "jobledger.map": MapOperator,
    "jobledger.filter": FilterOperator,
    "jobledger.flat_map": FlatMapOperator,
    "jobledger.aggregate": AggregateOperator,
    "jobledger.window.tumbling": TumblingWindowOperator,
    "jobledger.sink.print": PrintSink,
    "jobledger.sink.file": FileSink,
}

# The coordinator validates names against the shared lists, so they must
# name exactly the operators registered here.
if tuple(SOURCES) != SOURCE_NAMES or tuple(OPERATORS) != OPERATOR_NAMES:
    raise ImportError(
        "worker.operators.names does not list the registered operators; "
        "update SOURCE_NAMES and OPERATOR_NAMES"
    )


def create_source(
    name: str, config: dict[str, Any], context: OperatorContext
) -> FileSource:
    """Instantiate a source; raise ConfigError for an unknown name or config."""
    source = SOURCES.get(name)
    if source is None:
        raise ConfigError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    return source(config, context)


def create_operator(
    name: str, config: dict[str, Any], context: OperatorContext
) -> Operator:
    """Instantiate an operator; raise ConfigError for an unknown name or config."""
    operator = OPERATORS.get(name)
    if operator is None:
        known = ", ".join([*SOURCES, *OPERATORS])
        raise ConfigError(f"unknown operator {name!r}; known: {known}")
    return operator(config, context)


__all__ = [
    "OPERATORS",
    "SOURCES",
    "ConfigError",
    "FileSource",
    "Operator",
    "OperatorContext",
    "create_operator",
    "create_source",
]
