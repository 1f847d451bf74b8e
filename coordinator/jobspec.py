"""Job specs: a job graph written as a YAML or JSON file.

A spec names the job, lists its vertices (``id``, ``type``, ``operator`` and
optionally ``name``, ``parallelism``, ``config`` and ``chained``) and the
edges between them (``from``, ``to`` and optionally ``id``, ``shuffle`` and,
for ``shuffle: hash``, the ``key``). `load_job_graph` turns one into the
``JobGraph`` that SubmitJob takes and fills the edge ids of each vertex from
the edges. Relative paths in an operator ``config`` are kept as written,
because the worker resolves them.

The loader checks the spec's own shape only. Graph rules such as "at least
one source and one sink" or "no cycles" are the coordinator's, which rejects
such a graph with INVALID_ARGUMENT.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from google.protobuf import struct_pb2

from protos import jobmanager_internal_pb2 as fpb

VERTEX_TYPES: dict[str, fpb.VertexType.ValueType] = {
    "source": fpb.SOURCE,
    "operator": fpb.OPERATOR,
    "sink": fpb.SINK,
}
SHUFFLE_MODES: dict[str, fpb.ShuffleMode.ValueType] = {
    "forward": fpb.FORWARD,
    "broadcast": fpb.BROADCAST,
    "rescale": fpb.RESCALE,
    "hash": fpb.HASH,
}

_JOB_FIELDS = ("name", "vertices", "edges")
_VERTEX_FIELDS = ("id", "name", "type", "parallelism", "operator", "config", "chained")
_CHAINED_FIELDS = ("operator", "config")
_EDGE_FIELDS = ("from", "to", "id", "shuffle", "key")
# A Struct stores every number as a double, which represents integers exactly
# up to 2**53 only.
_MAX_EXACT_INTEGER = 2**53

_Choice = TypeVar("_Choice")


class JobSpecError(ValueError):
    """A job spec that cannot be read or is invalid.

    The message is one line: the file, the field path (such as
    ``vertices[1].type``), what is wrong and what to do.
    """


class _FieldError(Exception):
    """An invalid field, before the file name is known to the message."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def load_job_graph(path: str | os.PathLike[str]) -> fpb.JobGraph:
    """Read the YAML (``.yaml``, ``.yml``) or JSON (``.json``) spec at ``path``.

    Returns the job graph, with each vertex's input and output edge ids
    filled from the edges. Raises JobSpecError when the file cannot be read,
    is not valid YAML or JSON, or does not follow the spec format.
    """
    source = Path(path)
    document = _parse(source, _read_text(source))
    return build_job_graph(document, str(source))


def build_job_graph(document: object, source: str = "<spec>") -> fpb.JobGraph:
    """Build the job graph from a parsed spec (the mapping YAML or JSON gives).

    Raises JobSpecError naming ``source``, the first invalid field and the fix.
    """
    try:
        return _build_graph(document)
    except _FieldError as exc:
        raise JobSpecError(f"{source}: {exc.field}: {exc.problem}") from None


def _build_graph(document: object) -> fpb.JobGraph:
    spec = _mapping(document, "the spec", _JOB_FIELDS)
    graph = fpb.JobGraph(job_name=_string(spec, "name", "name", required=True))
    vertices = _sequence(spec.get("vertices"), "vertices", required=True)
    by_id: dict[str, fpb.JobVertex] = {}
    for index, entry in enumerate(vertices):
        vertex = _vertex(entry, f"vertices[{index}]")
        if vertex.id in by_id:
            raise _FieldError(
                f"vertices[{index}].id",
                f"vertex id {vertex.id!r} is used twice; give each vertex its own id",
            )
        by_id[vertex.id] = vertex
        graph.vertices.append(vertex)
    edge_ids: set[str] = set()
    for index, entry in enumerate(_sequence(spec.get("edges"), "edges")):
        edge = _edge(entry, f"edges[{index}]", by_id, edge_ids)
        graph.edges.append(edge)
    _link_edges(graph)
    return graph


def _read_text(source: Path) -> str:
    suffix = source.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise JobSpecError(
            f"{source}: unknown job spec extension {suffix or '(none)'!r}; "
            "name the file .yaml, .yml or .json"
        )
    try:
        return source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobSpecError(
            f"{source}: job spec file not found; check the path"
        ) from None
    except UnicodeDecodeError as exc:
        raise JobSpecError(
            f"{source}: job spec is not UTF-8 text ({exc.reason} at byte "
            f"{exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise JobSpecError(
            f"{source}: cannot read the job spec ({exc.strerror or exc}); "
            "check the path and its permissions"
        ) from None


def _parse(source: Path, text: str) -> object:
    if source.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise JobSpecError(
                f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: "
                f"{exc.msg}; fix the syntax"
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise JobSpecError(f"{source}: {_yaml_problem(exc)}; fix the syntax") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Return a one-line description of a YAML error with its position."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = " ".join(str(exc.problem or "syntax error").split())
        return (
            f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
        )
    return "invalid YAML: " + " ".join(str(exc).split())


def _vertex(entry: object, field: str) -> fpb.JobVertex:
    spec = _mapping(entry, field, _VERTEX_FIELDS)
    vertex_id = _string(spec, "id", f"{field}.id", required=True)
    vertex = fpb.JobVertex(
        id=vertex_id,
        name=_string(spec, "name", f"{field}.name") or vertex_id,
        vertex_type=_choice(spec, "type", f"{field}.type", VERTEX_TYPES),
        parallelism=_parallelism(spec.get("parallelism", 1), f"{field}.parallelism"),
        operator_definition=_definition(spec, field),
    )
    chained = _sequence(spec.get("chained"), f"{field}.chained")
    for index, link in enumerate(chained):
        link_field = f"{field}.chained[{index}]"
        link_spec = _mapping(link, link_field, _CHAINED_FIELDS)
        vertex.chained_operators.append(_definition(link_spec, link_field))
    return vertex


def _definition(spec: Mapping[str, Any], field: str) -> fpb.OperatorDefinition:
    name = _string(spec, "operator", f"{field}.operator", required=True)
    config = spec.get("config")
    struct = struct_pb2.Struct()
    if config is not None:
        if not isinstance(config, Mapping):
            raise _FieldError(
                f"{field}.config",
                f"must be a mapping of settings, not {_kind(config)}",
            )
        _check_json_value(config, f"{field}.config")
        struct.update(config)
    return fpb.OperatorDefinition(fully_qualified_name=name, configuration=struct)


def _edge(
    entry: object,
    field: str,
    vertices: Mapping[str, fpb.JobVertex],
    edge_ids: set[str],
) -> fpb.JobEdge:
    spec = _mapping(entry, field, _EDGE_FIELDS)
    ends = []
    for end in ("from", "to"):
        vertex_id = _string(spec, end, f"{field}.{end}", required=True)
        if vertex_id not in vertices:
            raise _FieldError(
                f"{field}.{end}",
                f"vertex {vertex_id!r} is not defined; use one of the vertex ids "
                f"{', '.join(sorted(vertices))}",
            )
        ends.append(vertex_id)
    edge_id = _string(spec, "id", f"{field}.id") or f"{ends[0]}-{ends[1]}"
    if edge_id in edge_ids:
        raise _FieldError(
            f"{field}.id",
            f"edge id {edge_id!r} is used twice; give the edge its own id",
        )
    edge_ids.add(edge_id)
    edge = fpb.JobEdge(id=edge_id, source_vertex_id=ends[0], target_vertex_id=ends[1])
    edge.shuffle_mode = _choice(
        spec, "shuffle", f"{field}.shuffle", SHUFFLE_MODES, default="forward"
    )
    key = _key(spec, field, edge.shuffle_mode)
    if key:
        edge.output_keying_config.key_selector_type_name = key
    return edge


def _key(
    spec: Mapping[str, Any], field: str, shuffle_mode: fpb.ShuffleMode.ValueType
) -> str:
    key = _string(spec, "key", f"{field}.key")
    if shuffle_mode == fpb.HASH and not key:
        raise _FieldError(
            f"{field}.key",
            "missing; a hash edge needs the key: a field name or module:function",
        )
    if shuffle_mode != fpb.HASH and key:
        raise _FieldError(
            f"{field}.key",
            "applies only to shuffle: hash; remove it or set shuffle: hash",
        )
    return key


def _link_edges(graph: fpb.JobGraph) -> None:
    """List each edge's id on the vertices at both of its ends."""
    by_id = {vertex.id: vertex for vertex in graph.vertices}
    for edge in graph.edges:
        by_id[edge.source_vertex_id].output_edge_ids.append(edge.id)
        by_id[edge.target_vertex_id].input_edge_ids.append(edge.id)


def _mapping(value: object, field: str, known: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _FieldError(field, f"must be a mapping, not {_kind(value)}")
    for key in value:
        if key not in known:
            raise _FieldError(
                f"{field}.{key}" if field != "the spec" else str(key),
                f"unknown field; the fields here are {', '.join(known)}",
            )
    return value


def _sequence(value: object, field: str, required: bool = False) -> list[Any]:
    if value is None:
        if required:
            raise _FieldError(field, "missing; list at least one entry")
        return []
    if not isinstance(value, list):
        raise _FieldError(field, f"must be a list, not {_kind(value)}")
    if required and not value:
        raise _FieldError(field, "is empty; list at least one entry")
    return value


def _string(
    spec: Mapping[str, Any], key: str, field: str, required: bool = False
) -> str:
    value = spec.get(key)
    if value is None:
        if required:
            raise _FieldError(field, "missing; this field is required")
        return ""
    if not isinstance(value, str):
        raise _FieldError(field, f"must be a string, not {_kind(value)}")
    if required and not value.strip():
        raise _FieldError(field, "is empty; give it a value")
    return value


def _choice(
    spec: Mapping[str, Any],
    key: str,
    field: str,
    choices: Mapping[str, _Choice],
    default: str | None = None,
) -> _Choice:
    value = spec.get(key, default)
    options = ", ".join(choices)
    if value is None:
        raise _FieldError(field, f"missing; use one of {options}")
    if not isinstance(value, str) or value.lower() not in choices:
        raise _FieldError(field, f"unknown value {value!r}; use one of {options}")
    return choices[value.lower()]


def _parallelism(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _FieldError(field, f"must be a whole number, not {_kind(value)}")
    if value < 1:
        raise _FieldError(field, f"is {value}; use 1 or more")
    if value > 2**31 - 1:
        raise _FieldError(field, f"is {value}; use a number below 2**31")
    return value


def _check_json_value(value: object, field: str) -> None:
    """Raise _FieldError unless ``value`` fits in a protobuf Struct exactly."""
    if value is None or isinstance(value, str | bool):
        return
    if isinstance(value, int):
        if abs(value) > _MAX_EXACT_INTEGER:
            raise _FieldError(
                field, f"{value} is too large to keep exactly; write it as a string"
            )
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _FieldError(field, f"{value} is not a finite number; use a number")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_value(item, f"{field}[{index}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _FieldError(
                    f"{field}.{key}",
                    f"the key must be a string, not {_kind(key)}; quote it",
                )
            _check_json_value(item, f"{field}.{key}")
        return
    raise _FieldError(
        field,
        f"{_kind(value)} is not supported here; use a string (quote it), "
        "number, boolean, list or mapping",
    )


def _kind(value: object) -> str:
    """Name the YAML or JSON kind of a parsed value for error messages."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({text!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"
