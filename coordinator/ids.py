"""Task identifiers as the Flink.NET protocol writes them."""

from __future__ import annotations


def task_id(job_vertex_id: str, subtask_index: int) -> str:
    """Return the task id "vertexId_subtaskIndex"."""
    return f"{job_vertex_id}_{subtask_index}"


def split_task_id(value: str) -> tuple[str, int]:
    """Split "vertexId_subtaskIndex"; raise ValueError for another shape."""
    vertex, sep, index = value.rpartition("_")
    if not sep or not vertex or not index.isdigit():
        raise ValueError(
            f"task id {value!r} is not of the form vertexId_subtaskIndex, "
            "for example 'map_0'"
        )
    return vertex, int(index)
