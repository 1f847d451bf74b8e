"""Job graphs and data files of the worker tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2

from protos import jobmanager_internal_pb2 as fpb

USERS = ("ann", "bob", "cid", "dee", "eve")


def write_events(path: Path, rows: int) -> list[dict[str, Any]]:
    """Write a CSV of ``rows`` events (user, amount, ts); return them typed."""
    events = [
        {"user": USERS[i % len(USERS)], "amount": i % 7 + 1, "ts": 1000 + i * 10}
        for i in range(rows)
    ]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["user", "amount", "ts"])
        writer.writeheader()
        writer.writerows(events)
    return events


def definition(name: str, **config: Any) -> fpb.OperatorDefinition:
    struct = struct_pb2.Struct()
    struct.update(config)
    return fpb.OperatorDefinition(fully_qualified_name=name, configuration=struct)


def keyed_sum_graph(
    source: Path,
    output: Path,
    parallelism: int = 2,
    delay_ms: float = 0.0,
    mode: str = "upsert",
    source_parallelism: int | None = None,
) -> fpb.JobGraph:
    """Return source -> HASH by user -> rolling sum -> file sink."""
    return fpb.JobGraph(
        job_name="keyed-sum",
        vertices=[
            fpb.JobVertex(
                id="src",
                parallelism=source_parallelism or parallelism,
                vertex_type=fpb.SOURCE,
                operator_definition=definition(
                    "jobledger.source.csv",
                    path=str(source),
                    timestamp_field="ts",
                    types={"amount": "int", "ts": "int"},
                    delay_ms=delay_ms,
                ),
                output_edge_ids=["e1"],
            ),
            fpb.JobVertex(
                id="sum",
                parallelism=parallelism,
                vertex_type=fpb.OPERATOR,
                operator_definition=definition(
                    "jobledger.aggregate", aggregate="sum", field="amount"
                ),
                input_edge_ids=["e1"],
                output_edge_ids=["e2"],
            ),
            fpb.JobVertex(
                id="sink",
                parallelism=parallelism,
                vertex_type=fpb.SINK,
                operator_definition=definition(
                    "jobledger.sink.file",
                    path=str(output.parent / (output.name + "-{subtask}")),
                    mode=mode,
                    key="key",
                ),
                input_edge_ids=["e2"],
            ),
        ],
        edges=[
            fpb.JobEdge(
                id="e1",
                source_vertex_id="src",
                target_vertex_id="sum",
                shuffle_mode=fpb.HASH,
                output_keying_config=fpb.OutputKeyingConfig(
                    key_selector_type_name="user"
                ),
            ),
            fpb.JobEdge(id="e2", source_vertex_id="sum", target_vertex_id="sink"),
        ],
    )


def expected_sums(events: list[dict[str, Any]]) -> dict[str, int]:
    sums: dict[str, int] = {}
    for event in events:
        sums[event["user"]] = sums.get(event["user"], 0) + event["amount"]
    return sums


def read_upsert_outputs(output: Path, parallelism: int) -> dict[str, int]:
    """Merge the upsert sink files of every subtask into key -> value."""
    merged: dict[str, int] = {}
    for index in range(parallelism):
        path = output.parent / f"{output.name}-{index}"
        for line in path.read_text().splitlines():
            row = json.loads(line)
            assert row["key"] not in merged, f"key {row['key']} in two subtasks"
            merged[row["key"]] = row["value"]
    return merged


def expected_rolling_sums(events: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Return the sequence of rolling sums per user, in event order."""
    sums: dict[str, list[int]] = {}
    for event in events:
        previous = sums.setdefault(event["user"], [])
        previous.append((previous[-1] if previous else 0) + event["amount"])
    return sums


def read_append_outputs(output: Path, parallelism: int) -> dict[str, list[int]]:
    """Return the rolling sums per key that the append sink files hold."""
    sums: dict[str, list[int]] = {}
    for index in range(parallelism):
        path = output.parent / f"{output.name}-{index}"
        for line in path.read_text().splitlines():
            row = json.loads(line)
            sums.setdefault(row["key"], []).append(row["value"])
    return sums


def windowed_count_graph(source: Path, output: Path) -> fpb.JobGraph:
    """Return source (2) -> HASH by user -> tumbling count chained with a file
    sink (2); the window vertex is the graph's sink."""
    return fpb.JobGraph(
        job_name="windowed-count",
        vertices=[
            fpb.JobVertex(
                id="src",
                parallelism=2,
                vertex_type=fpb.SOURCE,
                operator_definition=definition(
                    "jobledger.source.csv",
                    path=str(source),
                    timestamp_field="ts",
                    types={"amount": "int", "ts": "int"},
                ),
                output_edge_ids=["e1"],
            ),
            fpb.JobVertex(
                id="window",
                parallelism=2,
                vertex_type=fpb.SINK,
                operator_definition=definition(
                    "jobledger.window.tumbling", size_ms=100, aggregate="count"
                ),
                chained_operators=[
                    definition(
                        "jobledger.sink.file",
                        path=str(output.parent / (output.name + "-{subtask}")),
                    )
                ],
                input_edge_ids=["e1"],
            ),
        ],
        edges=[
            fpb.JobEdge(
                id="e1",
                source_vertex_id="src",
                target_vertex_id="window",
                shuffle_mode=fpb.HASH,
                output_keying_config=fpb.OutputKeyingConfig(
                    key_selector_type_name="user"
                ),
            ),
        ],
    )
