"""Unit tests of job graph validation and of the deployment descriptors."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from google.protobuf import struct_pb2

from coordinator.errors import InvalidArgument
from coordinator.graph import build_descriptor, slots_needed, validate
from coordinator.ids import task_id
from coordinator.state import apply, new_state
from protos import jobledger_events_pb2 as pb
from protos import jobmanager_internal_pb2 as fpb
from tests.harness import pipeline, vertex

MAX_PARALLELISM = 8


def two_stage(
    mode: fpb.ShuffleMode.ValueType, upstream: int, downstream: int
) -> fpb.JobGraph:
    """Return src -> sink over one edge ``e`` of the given shuffle mode."""
    return fpb.JobGraph(
        job_name="two-stage",
        vertices=[
            vertex("src", fpb.SOURCE, upstream, outputs=("e",)),
            vertex("sink", fpb.SINK, downstream, inputs=("e",)),
        ],
        edges=[
            fpb.JobEdge(
                id="e",
                source_vertex_id="src",
                target_vertex_id="sink",
                shuffle_mode=mode,
            )
        ],
    )


def submitted(graph: fpb.JobGraph, job_id: str = "job-1") -> pb.JobState:
    """Return the job state that applying a JobSubmitted event produces."""
    state = new_state()
    ev = pb.Event(
        seq=1, job_submitted=pb.JobSubmitted(job_id=job_id, graph=graph, job_number=1)
    )
    apply(state, ev)
    return state.jobs[job_id]


def placement_of(job: pb.JobState) -> dict[str, str]:
    """Place every task on its own made-up endpoint, 127.0.0.1:7000 upwards."""
    return {tid: f"127.0.0.1:{7000 + n}" for n, tid in enumerate(sorted(job.tasks))}


def descriptor_of(
    graph: fpb.JobGraph,
    vertex_id: str,
    subtask_index: int,
    restore: pb.CheckpointState | None = None,
) -> tuple[fpb.TaskDeploymentDescriptor, dict[str, str]]:
    job = submitted(graph)
    where = placement_of(job)
    by_id = {v.id: v for v in graph.vertices}
    descriptor = build_descriptor(job, by_id[vertex_id], subtask_index, where, restore)
    return descriptor, where


def upstream_indexes(descriptor: fpb.TaskDeploymentDescriptor) -> list[int]:
    return sorted(i.upstream_subtask_index for i in descriptor.inputs)


def downstream_indexes(descriptor: fpb.TaskDeploymentDescriptor) -> list[int]:
    return sorted(o.target_specific_subtask_index for o in descriptor.outputs)


# ------------------------------------------------------------------ validate


def test_validate_accepts_pipeline() -> None:
    validate(pipeline(MAX_PARALLELISM), MAX_PARALLELISM)


def test_validate_accepts_diamond() -> None:
    graph = fpb.JobGraph(
        vertices=[
            vertex("src", fpb.SOURCE, outputs=("a", "b")),
            vertex("left", fpb.OPERATOR, inputs=("a",), outputs=("c",)),
            vertex("right", fpb.OPERATOR, inputs=("b",), outputs=("d",)),
            vertex("sink", fpb.SINK, inputs=("c", "d")),
        ],
        edges=[
            fpb.JobEdge(id="a", source_vertex_id="src", target_vertex_id="left"),
            fpb.JobEdge(id="b", source_vertex_id="src", target_vertex_id="right"),
            fpb.JobEdge(id="c", source_vertex_id="left", target_vertex_id="sink"),
            fpb.JobEdge(id="d", source_vertex_id="right", target_vertex_id="sink"),
        ],
    )
    validate(graph, MAX_PARALLELISM)


def test_validate_accepts_forward_fan_in() -> None:
    validate(two_stage(fpb.FORWARD, 4, 2), MAX_PARALLELISM)


def _rename(index: int, new_id: str) -> Callable[[fpb.JobGraph], None]:
    def change(graph: fpb.JobGraph) -> None:
        graph.vertices[index].id = new_id

    return change


def _set_parallelism(value: int) -> Callable[[fpb.JobGraph], None]:
    def change(graph: fpb.JobGraph) -> None:
        graph.vertices[1].parallelism = value

    return change


def _set_kind(index: int, kind: int) -> Callable[[fpb.JobGraph], None]:
    def change(graph: fpb.JobGraph) -> None:
        graph.vertices[index].vertex_type = kind  # type: ignore[assignment]

    return change


def _no_vertices(graph: fpb.JobGraph) -> None:
    del graph.vertices[:]
    del graph.edges[:]


def _duplicate_edge_id(graph: fpb.JobGraph) -> None:
    graph.edges[1].id = "e1"


def _empty_edge_id(graph: fpb.JobGraph) -> None:
    graph.edges[0].id = ""


def _missing_source_vertex(graph: fpb.JobGraph) -> None:
    graph.edges[0].source_vertex_id = "ghost"


def _missing_target_vertex(graph: fpb.JobGraph) -> None:
    graph.edges[1].target_vertex_id = "ghost"


def _edge_into_source(graph: fpb.JobGraph) -> None:
    graph.edges[0].source_vertex_id = "map"
    graph.edges[0].target_vertex_id = "src"


def _edge_out_of_sink(graph: fpb.JobGraph) -> None:
    graph.edges[1].source_vertex_id = "sink"
    graph.edges[1].target_vertex_id = "map"


def _missing_from_outputs(graph: fpb.JobGraph) -> None:
    del graph.vertices[0].output_edge_ids[:]


def _missing_from_inputs(graph: fpb.JobGraph) -> None:
    del graph.vertices[2].input_edge_ids[:]


def _lists_unknown_edge(graph: fpb.JobGraph) -> None:
    graph.vertices[1].output_edge_ids.append("nowhere")


def _lists_edge_at_wrong_end(graph: fpb.JobGraph) -> None:
    graph.vertices[2].input_edge_ids.append("e1")


def _cycle(graph: fpb.JobGraph) -> None:
    graph.vertices[1].input_edge_ids.append("back")
    graph.vertices.insert(
        2, vertex("late", fpb.OPERATOR, inputs=("e2",), outputs=("back", "out"))
    )
    graph.vertices[1].output_edge_ids[:] = ["e2"]
    graph.vertices[3].input_edge_ids[:] = ["out"]
    graph.edges[1].target_vertex_id = "late"
    graph.edges.append(
        fpb.JobEdge(id="back", source_vertex_id="late", target_vertex_id="map")
    )
    graph.edges.append(
        fpb.JobEdge(id="out", source_vertex_id="late", target_vertex_id="sink")
    )


def _operator_without_input(graph: fpb.JobGraph) -> None:
    graph.vertices.append(vertex("orphan", fpb.OPERATOR))


def _forward_fan_out(graph: fpb.JobGraph) -> None:
    graph.vertices[1].parallelism = 2
    graph.vertices[2].parallelism = 2


INVALID: list[tuple[str, Callable[[fpb.JobGraph], None], str]] = [
    ("no-vertices", _no_vertices, "the job graph has no vertices"),
    ("empty-vertex-id", _rename(1, ""), "vertex 'map' has an empty id"),
    ("duplicate-vertex-id", _rename(2, "map"), "vertex id 'map' is used twice"),
    ("slash-in-vertex-id", _rename(1, "a/b"), "vertex id 'a/b' must not contain '/'"),
    ("parallelism-zero", _set_parallelism(0), "parallelism 0; it must be from 1 to 8"),
    ("parallelism-negative", _set_parallelism(-1), "parallelism -1"),
    ("parallelism-above-max", _set_parallelism(9), "parallelism 9; it must be from 1"),
    ("unknown-vertex-type", _set_kind(1, 7), "unknown vertex type 7"),
    ("no-source", _set_kind(0, fpb.OPERATOR), "no SOURCE vertex"),
    ("no-sink", _set_kind(2, fpb.OPERATOR), "no SINK vertex"),
    ("empty-edge-id", _empty_edge_id, "from 'src' to 'map' has an empty id"),
    ("duplicate-edge-id", _duplicate_edge_id, "edge id 'e1' is used twice"),
    ("missing-source", _missing_source_vertex, "names source vertex 'ghost'"),
    ("missing-target", _missing_target_vertex, "names target vertex 'ghost'"),
    ("edge-into-source", _edge_into_source, "leads into source vertex 'src'"),
    ("edge-out-of-sink", _edge_out_of_sink, "leaves sink vertex 'sink'"),
    (
        "missing-from-outputs",
        _missing_from_outputs,
        "edge 'e1' is missing from output_edge_ids of vertex 'src'",
    ),
    (
        "missing-from-inputs",
        _missing_from_inputs,
        "edge 'e2' is missing from input_edge_ids of vertex 'sink'",
    ),
    ("lists-unknown-edge", _lists_unknown_edge, "lists edge 'nowhere'"),
    ("lists-edge-wrong-end", _lists_edge_at_wrong_end, "does not touch it"),
    ("cycle", _cycle, "the job graph has a cycle: map -> late -> map"),
    ("operator-without-input", _operator_without_input, "vertex 'orphan' has no"),
    ("forward-fan-out", _forward_fan_out, "FORWARD edge 'e1'"),
]


@pytest.mark.parametrize(
    ("change", "problem"),
    [(change, problem) for _, change, problem in INVALID],
    ids=[name for name, _, _ in INVALID],
)
def test_validate_rejects(change: Callable[[fpb.JobGraph], None], problem: str) -> None:
    graph = pipeline()
    change(graph)
    with pytest.raises(InvalidArgument) as raised:
        validate(graph, MAX_PARALLELISM)
    assert problem in raised.value.message


def test_validate_checks_vertices_first() -> None:
    graph = pipeline()
    graph.vertices[1].parallelism = 0
    graph.edges[0].target_vertex_id = "ghost"
    with pytest.raises(InvalidArgument) as raised:
        validate(graph, MAX_PARALLELISM)
    assert "parallelism 0" in raised.value.message


def _named(graph: fpb.JobGraph, vertex_id: str) -> fpb.JobVertex:
    (found,) = [v for v in graph.vertices if v.id == vertex_id]
    return found


def test_validate_rejects_unknown_builtin_operator() -> None:
    graph = pipeline()
    _named(graph, "map").operator_definition.fully_qualified_name = "jobledger.nope"
    with pytest.raises(InvalidArgument) as raised:
        validate(graph, MAX_PARALLELISM)
    message = raised.value.message
    assert "vertex 'map'" in message
    assert "'jobledger.nope' is not a built-in operator" in message
    assert "jobledger.source.csv" in message
    assert "jobledger.sink.file" in message


def test_validate_rejects_unknown_chained_operator() -> None:
    graph = pipeline()
    chain = _named(graph, "map").chained_operators
    chain.append(fpb.OperatorDefinition(fully_qualified_name="jobledger.map"))
    chain.append(fpb.OperatorDefinition(fully_qualified_name="jobledger.mapp"))
    with pytest.raises(InvalidArgument) as raised:
        validate(graph, MAX_PARALLELISM)
    message = raised.value.message
    assert "vertex 'map': chained operator 1 'jobledger.mapp'" in message
    assert "known: jobledger.map," in message


def test_validate_rejects_chained_source() -> None:
    graph = pipeline()
    chain = _named(graph, "map").chained_operators
    chain.append(fpb.OperatorDefinition(fully_qualified_name="jobledger.source.csv"))
    with pytest.raises(InvalidArgument) as raised:
        validate(graph, MAX_PARALLELISM)
    assert "a source can only head a vertex" in raised.value.message


def test_validate_accepts_builtin_and_user_operators() -> None:
    graph = pipeline()
    _named(
        graph, "src"
    ).operator_definition.fully_qualified_name = "jobledger.source.csv"
    _named(graph, "map").operator_definition.fully_qualified_name = "jobledger.map"
    _named(graph, "map").chained_operators.append(
        fpb.OperatorDefinition(fully_qualified_name="my_company.enrich")
    )
    # A user operator outside the built-in namespace is resolved on the worker,
    # and so are paths and functions in a configuration.
    _named(graph, "sink").operator_definition.fully_qualified_name = "mysinks.Sink"
    _named(graph, "map").operator_definition.configuration.update(
        {"function": "nomodule:nofunc", "path": "/no/such/file.csv"}
    )
    validate(graph, MAX_PARALLELISM)


def test_builtin_names_match_worker_registry() -> None:
    from worker.operators import OPERATORS, SOURCES
    from worker.operators.names import OPERATOR_NAMES, SOURCE_NAMES

    assert tuple(SOURCES) == SOURCE_NAMES
    assert tuple(OPERATORS) == OPERATOR_NAMES


@pytest.mark.parametrize(
    ("where", "problem"),
    [
        ("operator", "vertex 'sink': the configuration of operator 'op.sink'"),
        ("chained", "vertex 'sink': the configuration of chained operator 0"),
    ],
)
def test_validate_rejects_nan_in_config(where: str, problem: str) -> None:
    # A Struct can contain NaN, but JSON has no NaN, so workers could not read it.
    graph = pipeline()
    definition = _named(graph, "sink").operator_definition
    if where == "chained":
        definition = _named(graph, "sink").chained_operators.add()
        definition.fully_qualified_name = "jobledger.filter"
    nested = definition.configuration.fields["nested"].struct_value
    nested.fields["x"].number_value = float("nan")
    with pytest.raises(InvalidArgument) as raised:
        validate(graph, MAX_PARALLELISM)
    assert problem in raised.value.message
    assert "is not a valid JSON object" in raised.value.message


def test_slots_needed_largest_parallelism() -> None:
    graph = two_stage(fpb.HASH, 3, 5)
    assert slots_needed(graph) == 5


# ------------------------------------------------------------------ descriptor basics


def test_descriptor_basic_fields() -> None:
    graph = pipeline(2)
    graph.vertices[1].operator_definition.configuration.update({"b": 2, "a": "x"})
    graph.vertices[1].input_type_name = "In"
    graph.vertices[1].output_type_name = "Out"
    descriptor, _ = descriptor_of(graph, "map", 1)
    assert descriptor.job_graph_job_id == "job-1"
    assert descriptor.job_vertex_id == "map"
    assert descriptor.subtask_index == 1
    assert descriptor.task_name == "map (2/2)"
    assert descriptor.fully_qualified_operator_name == "op.map"
    assert json.loads(descriptor.operator_configuration) == {"a": "x", "b": 2}
    # A Struct stores numbers as doubles; whole ones are sent as integers.
    assert descriptor.operator_configuration == b'{"a": "x", "b": 2}'
    assert descriptor.input_type_name == "In"
    assert descriptor.output_type_name == "Out"
    assert descriptor.attempt == 1
    assert descriptor.parallelism == 2
    assert not descriptor.is_recovery


def test_descriptor_empty_configuration() -> None:
    descriptor, _ = descriptor_of(pipeline(), "src", 0)
    assert descriptor.operator_configuration == b"{}"


def test_descriptor_chained_operators() -> None:
    graph = pipeline()
    configuration = struct_pb2.Struct()
    configuration.update({"limit": 3})
    graph.vertices[1].chained_operators.append(
        fpb.OperatorDefinition(
            fully_qualified_name="op.filter", configuration=configuration
        )
    )
    descriptor, _ = descriptor_of(graph, "map", 0)
    (chained,) = descriptor.chained_operator_info
    assert chained.original_job_vertex_id == "map"
    assert chained.fully_qualified_operator_name == "op.filter"
    assert json.loads(chained.operator_configuration) == {"limit": 3}


def test_descriptor_source_has_no_inputs() -> None:
    descriptor, _ = descriptor_of(pipeline(2), "src", 0)
    assert list(descriptor.inputs) == []
    assert list(descriptor.input_keying_info) == []


def test_descriptor_sink_has_no_outputs() -> None:
    descriptor, _ = descriptor_of(pipeline(2), "sink", 1)
    assert list(descriptor.outputs) == []
    assert dict(descriptor.output_shuffle_modes) == {}


# ------------------------------------------------------------------ shuffle modes


def test_forward_equal_parallelism_one_to_one() -> None:
    graph = two_stage(fpb.FORWARD, 3, 3)
    for index in range(3):
        sink, _ = descriptor_of(graph, "sink", index)
        assert upstream_indexes(sink) == [index]
        source, where = descriptor_of(graph, "src", index)
        (output,) = source.outputs
        assert output.target_vertex_id == "sink"
        assert output.target_specific_subtask_index == index
        assert output.target_task_endpoint == where[task_id("sink", index)]
        assert dict(source.output_shuffle_modes) == {"sink": fpb.FORWARD}


def test_forward_fan_in_by_modulo() -> None:
    graph = two_stage(fpb.FORWARD, 4, 2)
    first, _ = descriptor_of(graph, "sink", 0)
    second, _ = descriptor_of(graph, "sink", 1)
    assert upstream_indexes(first) == [0, 2]
    assert upstream_indexes(second) == [1, 3]
    for index in range(4):
        source, _ = descriptor_of(graph, "src", index)
        assert downstream_indexes(source) == [index % 2]


@pytest.mark.parametrize("mode", [fpb.HASH, fpb.BROADCAST, fpb.RESCALE])
def test_all_to_all_modes(mode: fpb.ShuffleMode.ValueType) -> None:
    graph = two_stage(mode, 2, 3)
    for index in range(3):
        sink, _ = descriptor_of(graph, "sink", index)
        assert upstream_indexes(sink) == [0, 1]
        assert all(i.upstream_job_vertex_id == "src" for i in sink.inputs)
        assert all(i.source_vertex_id == "src" for i in sink.inputs)
    for index in range(2):
        source, where = descriptor_of(graph, "src", index)
        assert downstream_indexes(source) == [0, 1, 2]
        endpoints = sorted(o.target_task_endpoint for o in source.outputs)
        assert endpoints == sorted(where[task_id("sink", i)] for i in range(3))
        assert dict(source.output_shuffle_modes) == {"sink": mode}


def test_unplaced_target_empty_endpoint() -> None:
    job = submitted(two_stage(fpb.HASH, 1, 2))
    source = {v.id: v for v in job.graph.vertices}["src"]
    descriptor = build_descriptor(job, source, 0, {"src_0": "127.0.0.1:7000"}, None)
    assert [o.target_task_endpoint for o in descriptor.outputs] == ["", ""]


# ------------------------------------------------------------------ keying


def test_hash_keying_from_edge() -> None:
    graph = two_stage(fpb.HASH, 2, 4)
    graph.edges[0].output_keying_config.key_selector_type_name = "KeyByUser"
    graph.edges[0].output_keying_config.key_type_assembly_name = "System.String"
    source, _ = descriptor_of(graph, "src", 0)
    (out_key,) = source.output_keying_info
    assert out_key.target_job_vertex_id == "sink"
    assert out_key.serialized_key_selector == "KeyByUser"
    assert out_key.key_type_name == "System.String"
    assert out_key.downstream_parallelism == 4
    sink, _ = descriptor_of(graph, "sink", 3)
    (in_key,) = sink.input_keying_info
    assert in_key.serialized_key_selector == "KeyByUser"
    assert in_key.key_type_name == "System.String"


def test_hash_keying_from_vertex() -> None:
    graph = two_stage(fpb.HASH, 1, 2)
    graph.vertices[0].output_edge_keying["e"].key_selector_type_name = "KeyBySource"
    source, _ = descriptor_of(graph, "src", 0)
    (out_key,) = source.output_keying_info
    assert out_key.serialized_key_selector == "KeyBySource"
    sink, _ = descriptor_of(graph, "sink", 0)
    (in_key,) = sink.input_keying_info
    assert in_key.serialized_key_selector == "KeyBySource"


def test_hash_keying_edge_wins() -> None:
    graph = two_stage(fpb.HASH, 1, 2)
    graph.vertices[0].output_edge_keying["e"].key_selector_type_name = "FromVertex"
    graph.edges[0].output_keying_config.key_selector_type_name = "FromEdge"
    source, _ = descriptor_of(graph, "src", 0)
    assert source.output_keying_info[0].serialized_key_selector == "FromEdge"


@pytest.mark.parametrize("mode", [fpb.FORWARD, fpb.BROADCAST, fpb.RESCALE])
def test_no_keying_without_hash(mode: fpb.ShuffleMode.ValueType) -> None:
    graph = two_stage(mode, 2, 2)
    graph.edges[0].output_keying_config.key_selector_type_name = "Ignored"
    source, _ = descriptor_of(graph, "src", 0)
    sink, _ = descriptor_of(graph, "sink", 0)
    assert list(source.output_keying_info) == []
    assert list(sink.input_keying_info) == []


def test_pipeline_keying_only_on_hash_edge() -> None:
    graph = pipeline(2)
    source, _ = descriptor_of(graph, "src", 0)
    operator, _ = descriptor_of(graph, "map", 0)
    sink, _ = descriptor_of(graph, "sink", 0)
    assert list(source.output_keying_info) == []
    assert len(operator.output_keying_info) == 1
    assert list(operator.input_keying_info) == []
    assert len(sink.input_keying_info) == 1


# ------------------------------------------------------------------ restore


def completed_checkpoint(
    checkpoint_id: int, acked: dict[str, int]
) -> pb.CheckpointState:
    checkpoint = pb.CheckpointState(
        checkpoint_id=checkpoint_id, job_id="job-1", status=pb.CHECKPOINT_COMPLETED
    )
    for tid, offset in acked.items():
        checkpoint.tasks_to_acknowledge.append(tid)
        ack = checkpoint.acknowledgements[tid]
        ack.task_id = tid
        ack.snapshot_handle = f"snapshot/{checkpoint_id}/{tid}"
        if offset:
            ack.source_offsets["partition-0"] = offset
    return checkpoint


def test_restore_fields_per_task() -> None:
    restore = completed_checkpoint(7, {"src_0": 120, "map_0": 0, "sink_0": 0})
    source, _ = descriptor_of(pipeline(), "src", 0, restore)
    assert source.is_recovery
    assert source.recovery_checkpoint_id == 7
    assert source.recovery_snapshot_handle == "snapshot/7/src_0"
    assert dict(source.recovery_source_offsets) == {"partition-0": 120}
    operator, _ = descriptor_of(pipeline(), "map", 0, restore)
    assert operator.recovery_snapshot_handle == "snapshot/7/map_0"
    assert dict(operator.recovery_source_offsets) == {}


def test_restore_task_without_acknowledgement() -> None:
    restore = completed_checkpoint(3, {"src_0": 5})
    sink, _ = descriptor_of(pipeline(), "sink", 0, restore)
    assert sink.is_recovery
    assert sink.recovery_checkpoint_id == 3
    assert sink.recovery_snapshot_handle == ""
    assert dict(sink.recovery_source_offsets) == {}


def test_fresh_start_has_no_restore() -> None:
    source, _ = descriptor_of(pipeline(), "src", 0, None)
    assert not source.is_recovery
    assert source.recovery_checkpoint_id == 0
    assert source.recovery_snapshot_handle == ""
    assert dict(source.recovery_source_offsets) == {}


def test_descriptor_carries_attempt() -> None:
    graph = pipeline()
    job = submitted(graph)
    job.tasks["map_0"].attempt = 4
    by_id = {v.id: v for v in graph.vertices}
    descriptor = build_descriptor(job, by_id["map"], 0, placement_of(job), None)
    assert descriptor.attempt == 4
