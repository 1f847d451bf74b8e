"""Job spec files: YAML and JSON to JobGraph, and the errors on bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

from coordinator.jobspec import JobSpecError, load_job_graph
from protos import jobmanager_internal_pb2 as fpb

SPEC: dict[str, Any] = {
    "name": "flight-delays",
    "vertices": [
        {
            "id": "flights",
            "name": "Flights",
            "type": "source",
            "parallelism": 2,
            "operator": "jobledger.source.csv",
            "config": {"path": "data/flights.csv", "types": {"dep_delay": "float"}},
        },
        {
            "id": "delayed",
            "type": "operator",
            "parallelism": 2,
            "operator": "jobledger.filter",
            "config": {"function": "flights:has_delay"},
        },
        {
            "id": "windows",
            "type": "sink",
            "parallelism": 2,
            "operator": "jobledger.window.tumbling",
            "config": {"size_ms": 86_400_000, "allowed_lateness_ms": 0},
            "chained": [
                {"operator": "jobledger.sink.file", "config": {"path": "out-{subtask}"}}
            ],
        },
    ],
    "edges": [
        {"from": "flights", "to": "delayed"},
        {
            "from": "delayed",
            "to": "windows",
            "id": "by-carrier",
            "shuffle": "hash",
            "key": "carrier",
        },
    ],
}


def write_yaml(tmp_path: Path, spec: object, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def load_error(path: Path) -> str:
    """Load ``path``, expecting a JobSpecError; return its message."""
    with pytest.raises(JobSpecError) as caught:
        load_job_graph(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def test_yaml_spec_builds_graph(tmp_path: Path) -> None:
    graph = load_job_graph(write_yaml(tmp_path, SPEC))

    assert graph.job_name == "flight-delays"
    assert [vertex.id for vertex in graph.vertices] == ["flights", "delayed", "windows"]
    flights, delayed, windows = graph.vertices
    assert flights.name == "Flights"
    assert delayed.name == "delayed"
    assert [v.vertex_type for v in graph.vertices] == [
        fpb.SOURCE,
        fpb.OPERATOR,
        fpb.SINK,
    ]
    assert [v.parallelism for v in graph.vertices] == [2, 2, 2]
    assert flights.operator_definition.fully_qualified_name == "jobledger.source.csv"
    config = json_format.MessageToDict(flights.operator_definition.configuration)
    assert config == {"path": "data/flights.csv", "types": {"dep_delay": "float"}}
    window_config = json_format.MessageToDict(windows.operator_definition.configuration)
    assert window_config == {"size_ms": 86_400_000, "allowed_lateness_ms": 0}
    assert len(windows.chained_operators) == 1
    assert windows.chained_operators[0].fully_qualified_name == "jobledger.sink.file"


def test_yaml_spec_fills_edges(tmp_path: Path) -> None:
    graph = load_job_graph(write_yaml(tmp_path, SPEC))

    first, second = graph.edges
    assert (first.id, first.source_vertex_id, first.target_vertex_id) == (
        "flights-delayed",
        "flights",
        "delayed",
    )
    assert first.shuffle_mode == fpb.FORWARD
    assert not first.HasField("output_keying_config")
    assert second.id == "by-carrier"
    assert second.shuffle_mode == fpb.HASH
    assert second.output_keying_config.key_selector_type_name == "carrier"
    flights, delayed, windows = graph.vertices
    assert list(flights.input_edge_ids) == []
    assert list(flights.output_edge_ids) == ["flights-delayed"]
    assert list(delayed.input_edge_ids) == ["flights-delayed"]
    assert list(delayed.output_edge_ids) == ["by-carrier"]
    assert list(windows.input_edge_ids) == ["by-carrier"]
    assert list(windows.output_edge_ids) == []


def test_json_spec_equals_yaml(tmp_path: Path) -> None:
    json_path = tmp_path / "job.json"
    json_path.write_text(json.dumps(SPEC))

    assert load_job_graph(json_path) == load_job_graph(write_yaml(tmp_path, SPEC))


def test_yml_extension_and_defaults(tmp_path: Path) -> None:
    spec = {
        "name": "tiny",
        "vertices": [
            {"id": "a", "type": "source", "operator": "jobledger.source.csv"},
            {"id": "b", "type": "sink", "operator": "jobledger.sink.file"},
        ],
    }
    graph = load_job_graph(write_yaml(tmp_path, spec, "tiny.yml"))

    assert [v.parallelism for v in graph.vertices] == [1, 1]
    assert [v.name for v in graph.vertices] == ["a", "b"]
    assert len(graph.edges) == 0
    assert graph.vertices[0].operator_definition.configuration.fields == {}


def test_relative_config_path_kept(tmp_path: Path) -> None:
    graph = load_job_graph(write_yaml(tmp_path, SPEC))

    path = graph.vertices[0].operator_definition.configuration.fields["path"]
    assert path.string_value == "data/flights.csv"


def test_accepts_pathlike_string(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, SPEC)

    assert load_job_graph(str(path)) == load_job_graph(os.fspath(path))


def mutate(change: Any) -> dict[str, Any]:
    spec = json.loads(json.dumps(SPEC))
    change(spec)
    return spec


BAD_SPECS = {
    "missing name": (mutate(lambda s: s.pop("name")), "name: missing"),
    "missing vertices": (mutate(lambda s: s.pop("vertices")), "vertices: missing"),
    "empty vertices": (mutate(lambda s: s.update(vertices=[])), "vertices: is empty"),
    "missing vertex id": (
        mutate(lambda s: s["vertices"][1].pop("id")),
        "vertices[1].id: missing",
    ),
    "missing operator": (
        mutate(lambda s: s["vertices"][0].pop("operator")),
        "vertices[0].operator: missing",
    ),
    "missing type": (
        mutate(lambda s: s["vertices"][2].pop("type")),
        "vertices[2].type: missing; use one of source, operator, sink",
    ),
    "unknown type": (
        mutate(lambda s: s["vertices"][1].update(type="mapper")),
        "vertices[1].type: unknown value 'mapper'; use one of source, operator, sink",
    ),
    "unknown shuffle": (
        mutate(lambda s: s["edges"][0].update(shuffle="random")),
        "edges[0].shuffle: unknown value 'random'; use one of forward, broadcast",
    ),
    "duplicate vertex id": (
        mutate(lambda s: s["vertices"][2].update(id="flights")),
        "vertices[2].id: vertex id 'flights' is used twice",
    ),
    "duplicate edge id": (
        mutate(lambda s: s["edges"][1].update(id="flights-delayed")),
        "edges[1].id: edge id 'flights-delayed' is used twice",
    ),
    "edge from unknown vertex": (
        mutate(lambda s: s["edges"][0].update({"from": "planes"})),
        "edges[0].from: vertex 'planes' is not defined",
    ),
    "edge to unknown vertex": (
        mutate(lambda s: s["edges"][1].update(to="output")),
        "edges[1].to: vertex 'output' is not defined",
    ),
    "hash without key": (
        mutate(lambda s: s["edges"][1].pop("key")),
        "edges[1].key: missing; a hash edge needs the key",
    ),
    "key without hash": (
        mutate(lambda s: s["edges"][0].update(key="carrier")),
        "edges[0].key: applies only to shuffle: hash",
    ),
    "zero parallelism": (
        mutate(lambda s: s["vertices"][0].update(parallelism=0)),
        "vertices[0].parallelism: is 0; use 1 or more",
    ),
    "text parallelism": (
        mutate(lambda s: s["vertices"][0].update(parallelism="two")),
        "vertices[0].parallelism: must be a whole number",
    ),
    "unknown vertex field": (
        mutate(lambda s: s["vertices"][0].update(paralelism=2)),
        "vertices[0].paralelism: unknown field",
    ),
    "config not a mapping": (
        mutate(lambda s: s["vertices"][0].update(config="path=x")),
        "vertices[0].config: must be a mapping",
    ),
    "chained without operator": (
        mutate(lambda s: s["vertices"][2]["chained"][0].pop("operator")),
        "vertices[2].chained[0].operator: missing",
    ),
    "vertex not a mapping": (
        mutate(lambda s: s["vertices"].append("sink")),
        "vertices[3]: must be a mapping, not a string ('sink')",
    ),
    "spec not a mapping": (["name", "vertices"], "the spec: must be a mapping"),
    "empty file": (None, "the spec: must be a mapping, not nothing"),
}


@pytest.mark.parametrize("case", BAD_SPECS, ids=list(BAD_SPECS))
def test_bad_spec_names_field(tmp_path: Path, case: str) -> None:
    spec, expected = BAD_SPECS[case]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec) if spec is not None else "")

    assert expected in load_error(path)


def test_yaml_date_in_config_rejected(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "name: dated\n"
        "vertices:\n"
        "  - id: a\n"
        "    type: source\n"
        "    operator: jobledger.source.csv\n"
        "    config:\n"
        "      start: 2013-01-01\n"
    )

    message = load_error(path)
    assert "vertices[0].config.start: a date is not supported here" in message


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: x\nvertices:\n  - id: a\n    type: [source\n")

    message = load_error(path)
    assert "invalid YAML at line 5, column 1" in message
    assert message.endswith("fix the syntax")


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text('{"name": "x",\n "vertices": [}\n')

    message = load_error(path)
    assert "invalid JSON at line 2, column 15" in message


def test_missing_file(tmp_path: Path) -> None:
    message = load_error(tmp_path / "absent.yaml")

    assert "job spec file not found; check the path" in message


def test_directory_unreadable(tmp_path: Path) -> None:
    folder = tmp_path / "folder.yaml"
    folder.mkdir()

    message = load_error(folder)
    assert "cannot read the job spec" in message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(b"name: caf\xe9\n")

    message = load_error(path)
    assert "is not UTF-8 text" in message


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text("name = 'x'\n")

    message = load_error(path)
    assert "unknown job spec extension '.toml'" in message
