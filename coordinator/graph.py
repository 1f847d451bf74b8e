"""Job graph validation and the deployment descriptors built from a graph."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format

from coordinator.errors import InvalidArgument
from coordinator.ids import task_id
from protos import jobledger_events_pb2 as pb
from protos import jobmanager_internal_pb2 as fpb
from worker.operators.names import BUILTIN_NAMESPACE, OPERATOR_NAMES, SOURCE_NAMES

_KINDS = {fpb.SOURCE: "source", fpb.OPERATOR: "operator", fpb.SINK: "sink"}


def validate(graph: fpb.JobGraph, max_parallelism: int) -> None:
    """Raise InvalidArgument naming the first problem of the graph."""
    vertices = _check_vertices(graph, max_parallelism)
    _check_operators(graph)
    edges = _check_edges(graph, vertices)
    _check_edge_lists(graph, edges)
    _check_inputs(graph, vertices, edges)
    _check_acyclic(graph)


def _check_vertices(
    graph: fpb.JobGraph, max_parallelism: int
) -> dict[str, fpb.JobVertex]:
    if not graph.vertices:
        raise InvalidArgument("the job graph has no vertices; add a source and a sink")
    vertices: dict[str, fpb.JobVertex] = {}
    for vertex in graph.vertices:
        if not vertex.id:
            raise InvalidArgument(
                f"vertex {vertex.name!r} has an empty id; give it one"
            )
        if vertex.id in vertices:
            raise InvalidArgument(f"vertex id {vertex.id!r} is used twice")
        if "/" in vertex.id:
            raise InvalidArgument(f"vertex id {vertex.id!r} must not contain '/'")
        if not 1 <= vertex.parallelism <= max_parallelism:
            raise InvalidArgument(
                f"vertex {vertex.id!r} has parallelism {vertex.parallelism}; "
                f"it must be from 1 to {max_parallelism}"
            )
        if vertex.vertex_type not in _KINDS:
            raise InvalidArgument(
                f"vertex {vertex.id!r} has unknown vertex type {vertex.vertex_type}"
            )
        vertices[vertex.id] = vertex
    kinds = {vertex.vertex_type for vertex in graph.vertices}
    if fpb.SOURCE not in kinds:
        raise InvalidArgument("the job graph has no SOURCE vertex")
    if fpb.SINK not in kinds:
        raise InvalidArgument("the job graph has no SINK vertex")
    return vertices


def _check_operators(graph: fpb.JobGraph) -> None:
    """Reject built-in operator names that do not exist and invalid configurations.

    Names outside the built-in namespace are left to the workers, which may
    run operators the coordinator does not know, so only their configuration
    is checked here. File paths and functions are resolved on the workers too.
    """
    for vertex in graph.vertices:
        _check_operator(vertex.id, vertex.operator_definition, "operator", True)
        for position, chained in enumerate(vertex.chained_operators):
            role = f"chained operator {position}"
            _check_operator(vertex.id, chained, role, False)


def _check_operator(
    vertex_id: str, definition: fpb.OperatorDefinition, role: str, is_head: bool
) -> None:
    name = definition.fully_qualified_name
    known = [*SOURCE_NAMES, *OPERATOR_NAMES] if is_head else list(OPERATOR_NAMES)
    if name.startswith(BUILTIN_NAMESPACE) and name not in known:
        hint = ""
        if not is_head and name in SOURCE_NAMES:
            hint = " (a source can only head a vertex)"
        raise InvalidArgument(
            f"vertex {vertex_id!r}: {role} {name!r} is not a built-in operator"
            f"{hint}; known: {', '.join(known)}"
        )
    try:
        _config_bytes(definition)
    except (ValueError, json_format.Error) as exc:
        raise InvalidArgument(
            f"vertex {vertex_id!r}: the configuration of {role} {name!r} is not "
            f"a valid JSON object: {exc}; use only finite numbers"
        ) from exc


def _check_edges(
    graph: fpb.JobGraph, vertices: Mapping[str, fpb.JobVertex]
) -> dict[str, fpb.JobEdge]:
    edges: dict[str, fpb.JobEdge] = {}
    for edge in graph.edges:
        if not edge.id:
            raise InvalidArgument(
                f"an edge from {edge.source_vertex_id!r} to "
                f"{edge.target_vertex_id!r} has an empty id"
            )
        if edge.id in edges:
            raise InvalidArgument(f"edge id {edge.id!r} is used twice")
        for end, vertex_id in (
            ("source", edge.source_vertex_id),
            ("target", edge.target_vertex_id),
        ):
            if vertex_id not in vertices:
                raise InvalidArgument(
                    f"edge {edge.id!r} names {end} vertex {vertex_id!r}, "
                    "which is not a vertex of the graph"
                )
        if vertices[edge.target_vertex_id].vertex_type == fpb.SOURCE:
            raise InvalidArgument(
                f"edge {edge.id!r} leads into source vertex {edge.target_vertex_id!r}"
            )
        if vertices[edge.source_vertex_id].vertex_type == fpb.SINK:
            raise InvalidArgument(
                f"edge {edge.id!r} leaves sink vertex {edge.source_vertex_id!r}"
            )
        edges[edge.id] = edge
    return edges


def _check_edge_lists(graph: fpb.JobGraph, edges: Mapping[str, fpb.JobEdge]) -> None:
    for vertex in graph.vertices:
        for field, end in (
            (vertex.output_edge_ids, "source_vertex_id"),
            (vertex.input_edge_ids, "target_vertex_id"),
        ):
            for edge_id in field:
                edge = edges.get(edge_id)
                if edge is None:
                    raise InvalidArgument(
                        f"vertex {vertex.id!r} lists edge {edge_id!r}, "
                        "which is not an edge of the graph"
                    )
                if getattr(edge, end) != vertex.id:
                    raise InvalidArgument(
                        f"vertex {vertex.id!r} lists edge {edge_id!r}, "
                        "which does not touch it at that end"
                    )
    by_id = {vertex.id: vertex for vertex in graph.vertices}
    for edge in edges.values():
        if edge.id not in by_id[edge.source_vertex_id].output_edge_ids:
            raise InvalidArgument(
                f"edge {edge.id!r} is missing from output_edge_ids of "
                f"vertex {edge.source_vertex_id!r}"
            )
        if edge.id not in by_id[edge.target_vertex_id].input_edge_ids:
            raise InvalidArgument(
                f"edge {edge.id!r} is missing from input_edge_ids of "
                f"vertex {edge.target_vertex_id!r}"
            )


def _check_inputs(
    graph: fpb.JobGraph,
    vertices: Mapping[str, fpb.JobVertex],
    edges: Mapping[str, fpb.JobEdge],
) -> None:
    """Reject graphs in which a subtask other than a source gets no input.

    Only sources are triggered, so such a subtask never receives a barrier
    and no checkpoint of the job could complete.
    """
    for vertex in graph.vertices:
        if vertex.vertex_type != fpb.SOURCE and not vertex.input_edge_ids:
            raise InvalidArgument(
                f"vertex {vertex.id!r} has no input edges; only a SOURCE vertex "
                "may have none"
            )
    for edge in edges.values():
        upstream = vertices[edge.source_vertex_id]
        target = vertices[edge.target_vertex_id]
        # FORWARD sends subtask i to subtask i % target parallelism, so a
        # larger target parallelism leaves the higher target subtasks idle.
        if (
            edge.shuffle_mode == fpb.FORWARD
            and target.parallelism > upstream.parallelism
        ):
            raise InvalidArgument(
                f"FORWARD edge {edge.id!r} goes from parallelism "
                f"{upstream.parallelism} of {upstream.id!r} to "
                f"{target.parallelism} of {target.id!r}, so subtasks "
                f"{upstream.parallelism} and up of {target.id!r} would get no "
                "input; give both vertices the same parallelism, or use HASH, "
                "BROADCAST or RESCALE"
            )


def _check_acyclic(graph: fpb.JobGraph) -> None:
    successors: dict[str, list[str]] = {vertex.id: [] for vertex in graph.vertices}
    for edge in graph.edges:
        successors[edge.source_vertex_id].append(edge.target_vertex_id)
    done: set[str] = set()
    for start in successors:
        if start in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, int]] = [(start, 0)]
        while stack:
            vertex, index = stack.pop()
            if index == 0:
                path.append(vertex)
                on_path.add(vertex)
            nexts = successors[vertex]
            if index < len(nexts):
                stack.append((vertex, index + 1))
                target = nexts[index]
                if target in on_path:
                    cycle = [*path[path.index(target) :], target]
                    raise InvalidArgument(
                        "the job graph has a cycle: " + " -> ".join(cycle)
                    )
                if target not in done:
                    stack.append((target, 0))
                continue
            path.pop()
            on_path.discard(vertex)
            done.add(vertex)


def slots_needed(graph: fpb.JobGraph) -> int:
    """Return the slots a job takes: Flink's slot sharing puts subtask i of
    every vertex into shared slot i, so the largest parallelism counts."""
    return max(vertex.parallelism for vertex in graph.vertices)


def _config_bytes(definition: fpb.OperatorDefinition) -> bytes:
    if not definition.HasField("configuration"):
        return b"{}"
    as_dict = json_format.MessageToDict(definition.configuration)
    return json.dumps(_integral(as_dict), sort_keys=True, allow_nan=False).encode()


def _integral(value: Any) -> Any:
    """Turn whole numbers back into ints: a Struct stores every number as a
    double, and an operator expecting an integer setting should get 2, not
    2.0."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


def build_descriptor(
    job: pb.JobState,
    vertex: fpb.JobVertex,
    subtask_index: int,
    placement: Mapping[str, str],
    restore: pb.CheckpointState | None,
) -> fpb.TaskDeploymentDescriptor:
    """Describe one subtask for DeployTask.

    ``placement`` maps every task id of the job to the "host:port" of the
    task manager that runs it; ``restore`` is the completed checkpoint the
    attempt restores, or None for a fresh start.
    """
    graph = job.graph
    tid = task_id(vertex.id, subtask_index)
    task = job.tasks[tid]
    descriptor = fpb.TaskDeploymentDescriptor(
        job_graph_job_id=job.job_id,
        job_vertex_id=vertex.id,
        subtask_index=subtask_index,
        task_name=f"{vertex.name or vertex.id} ({subtask_index + 1}/"
        f"{vertex.parallelism})",
        fully_qualified_operator_name=vertex.operator_definition.fully_qualified_name,
        operator_configuration=_config_bytes(vertex.operator_definition),
        input_type_name=vertex.input_type_name,
        output_type_name=vertex.output_type_name,
        input_serializer_type_name=vertex.input_serializer_type_name,
        output_serializer_type_name=vertex.output_serializer_type_name,
        attempt=task.attempt,
        parallelism=vertex.parallelism,
    )
    vertices = {v.id: v for v in graph.vertices}
    edges = {e.id: e for e in graph.edges}
    _add_inputs(descriptor, vertex, vertices, edges)
    _add_outputs(descriptor, vertex, subtask_index, vertices, edges, placement)
    for chained in vertex.chained_operators:
        descriptor.chained_operator_info.append(
            fpb.ChainedOperatorInfo(
                original_job_vertex_id=vertex.id,
                fully_qualified_operator_name=chained.fully_qualified_name,
                operator_configuration=_config_bytes(chained),
            )
        )
    if restore is not None:
        _add_restore(descriptor, tid, restore)
    return descriptor


def _add_inputs(
    descriptor: fpb.TaskDeploymentDescriptor,
    vertex: fpb.JobVertex,
    vertices: Mapping[str, fpb.JobVertex],
    edges: Mapping[str, fpb.JobEdge],
) -> None:
    for edge_id in vertex.input_edge_ids:
        edge = edges[edge_id]
        upstream = vertices[edge.source_vertex_id]
        for index in _upstream_subtasks(
            edge, upstream, vertex, descriptor.subtask_index
        ):
            descriptor.inputs.append(
                fpb.OperatorInput(
                    source_vertex_id=upstream.id,
                    upstream_job_vertex_id=upstream.id,
                    upstream_subtask_index=index,
                )
            )
        if edge.shuffle_mode == fpb.HASH:
            descriptor.input_keying_info.append(
                fpb.InputKeyingInfo(
                    serialized_key_selector=_key_selector(edge, upstream),
                    key_type_name=edge.output_keying_config.key_type_assembly_name,
                )
            )


def _upstream_subtasks(
    edge: fpb.JobEdge, upstream: fpb.JobVertex, vertex: fpb.JobVertex, index: int
) -> list[int]:
    if edge.shuffle_mode == fpb.FORWARD:
        return [
            i for i in range(upstream.parallelism) if i % vertex.parallelism == index
        ]
    return list(range(upstream.parallelism))


def _add_outputs(
    descriptor: fpb.TaskDeploymentDescriptor,
    vertex: fpb.JobVertex,
    subtask_index: int,
    vertices: Mapping[str, fpb.JobVertex],
    edges: Mapping[str, fpb.JobEdge],
    placement: Mapping[str, str],
) -> None:
    for edge_id in vertex.output_edge_ids:
        edge = edges[edge_id]
        target = vertices[edge.target_vertex_id]
        descriptor.output_shuffle_modes[target.id] = edge.shuffle_mode
        if edge.shuffle_mode == fpb.FORWARD:
            indexes = [subtask_index % target.parallelism]
        else:
            indexes = list(range(target.parallelism))
        for index in indexes:
            descriptor.outputs.append(
                fpb.OperatorOutput(
                    target_vertex_id=target.id,
                    target_task_endpoint=placement.get(task_id(target.id, index), ""),
                    target_specific_subtask_index=index,
                )
            )
        if edge.shuffle_mode == fpb.HASH:
            descriptor.output_keying_info.append(
                fpb.OutputEdgeKeyingInfo(
                    target_job_vertex_id=target.id,
                    serialized_key_selector=_key_selector(edge, vertex),
                    key_type_name=edge.output_keying_config.key_type_assembly_name,
                    downstream_parallelism=target.parallelism,
                )
            )


def _key_selector(edge: fpb.JobEdge, upstream: fpb.JobVertex) -> str:
    if edge.output_keying_config.key_selector_type_name:
        return edge.output_keying_config.key_selector_type_name
    keying = upstream.output_edge_keying.get(edge.id)
    return keying.key_selector_type_name if keying is not None else ""


def _add_restore(
    descriptor: fpb.TaskDeploymentDescriptor, tid: str, restore: pb.CheckpointState
) -> None:
    descriptor.is_recovery = True
    descriptor.recovery_checkpoint_id = restore.checkpoint_id
    ack = restore.acknowledgements.get(tid)
    if ack is not None:
        descriptor.recovery_snapshot_handle = ack.snapshot_handle
        descriptor.recovery_source_offsets.update(ack.source_offsets)
