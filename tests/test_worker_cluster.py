"""A real coordinator with real workers in this process, running whole jobs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator.config import FixedDelayRestart
from protos import jobledger_events_pb2 as pb
from tests.harness import Cluster
from tests.worker_helpers.jobs import (
    expected_rolling_sums,
    expected_sums,
    keyed_sum_graph,
    read_append_outputs,
    read_upsert_outputs,
    windowed_count_graph,
    write_events,
)
from worker.server import Worker, WorkerConfig


async def start_worker(cluster: Cluster, state_dir: Path, name: str) -> Worker:
    worker = Worker(
        WorkerConfig(
            coordinators=[f"127.0.0.1:{cluster.coordinator.port}"],
            state_dir=str(state_dir / name),
            slots=4,
            task_manager_id=name,
            heartbeat_interval_s=0.2,
        )
    )
    await worker.start()
    await worker.wait_registered()
    return worker


@pytest.fixture
async def workers(cluster: Cluster, tmp_path: Path) -> AsyncIterator[list[Worker]]:
    started = [
        await start_worker(cluster, tmp_path / "state", f"tm-{i}") for i in range(2)
    ]
    yield started
    for worker in started:
        await worker.stop()


@pytest.fixture
async def one_worker(cluster: Cluster, tmp_path: Path) -> AsyncIterator[Worker]:
    worker = await start_worker(cluster, tmp_path / "state", "tm-solo")
    yield worker
    await worker.stop()


async def wait_job(cluster: Cluster, job_id: str, status: int, timeout: float = 20):
    await cluster.wait(lambda s: s.jobs[job_id].status == status, timeout)


async def test_keyed_job_runs_to_end(
    cluster: Cluster, workers: list[Worker], tmp_path: Path
) -> None:
    events = write_events(tmp_path / "events.csv", 200)
    graph = keyed_sum_graph(tmp_path / "events.csv", tmp_path / "out")
    job_id = await cluster.submit(graph)
    await wait_job(cluster, job_id, pb.JOB_FINISHED)
    assert read_upsert_outputs(tmp_path / "out", 2) == expected_sums(events)


def completed_checkpoints(state: pb.CoordinatorState, job_id: str) -> list[int]:
    return sorted(
        c.checkpoint_id
        for c in state.checkpoints.values()
        if c.job_id == job_id
        and c.status in (pb.CHECKPOINT_COMPLETED, pb.CHECKPOINT_DISCARDED)
    )


FAILOVER = {
    "checkpoints": {"interval_s": 0.1},
    "heartbeat_interval_s": 0.2,
    "heartbeat_timeout_s": 1.0,
    "restart": FixedDelayRestart(attempts=20, delay_s=0.1),
}


@pytest.mark.coordinator(**FAILOVER)
async def test_checkpoints_complete_during_job(
    cluster: Cluster, workers: list[Worker], tmp_path: Path
) -> None:
    events = write_events(tmp_path / "events.csv", 300)
    graph = keyed_sum_graph(
        tmp_path / "events.csv", tmp_path / "out", delay_ms=2, mode="append"
    )
    job_id = await cluster.submit(graph)
    await cluster.wait(lambda s: len(completed_checkpoints(s, job_id)) >= 2)
    await wait_job(cluster, job_id, pb.JOB_FINISHED)
    checkpoint = cluster.state.checkpoints[
        completed_checkpoints(cluster.state, job_id)[0]
    ]
    sources = [a for t, a in checkpoint.acknowledgements.items() if t.startswith("src")]
    assert len(sources) == 2
    assert all(a.source_offsets["row"] > 0 for a in sources)
    assert all(a.snapshot_size > 0 for a in checkpoint.acknowledgements.values())
    totals = {k: v[-1] for k, v in read_append_outputs(tmp_path / "out", 2).items()}
    assert totals == expected_sums(events)
    # Only the latest checkpoint is retained; the workers delete the rest.
    assert checkpoint.status == pb.CHECKPOINT_DISCARDED
    handles = [Path(a.snapshot_handle) for a in checkpoint.acknowledgements.values()]
    async with asyncio.timeout(10):
        while any(handle.exists() for handle in handles):
            await asyncio.sleep(0.01)


@pytest.mark.coordinator(**FAILOVER)
async def test_lost_worker_recovers_exactly_once(
    cluster: Cluster, workers: list[Worker], tmp_path: Path
) -> None:
    events = write_events(tmp_path / "events.csv", 400)
    graph = keyed_sum_graph(
        tmp_path / "events.csv",
        tmp_path / "out",
        delay_ms=2,
        mode="append",
        source_parallelism=1,
    )
    job_id = await cluster.submit(graph)
    await cluster.wait(lambda s: len(completed_checkpoints(s, job_id)) >= 1)
    await workers[1].stop()
    await cluster.wait(lambda s: s.jobs[job_id].restarts >= 1)
    await wait_job(cluster, job_id, pb.JOB_FINISHED, timeout=30)
    assert cluster.state.jobs[job_id].tasks["src_0"].attempt > 1
    assert read_append_outputs(tmp_path / "out", 2) == expected_rolling_sums(events)


async def test_window_job_on_one_worker(
    cluster: Cluster, one_worker: Worker, tmp_path: Path
) -> None:
    events = write_events(tmp_path / "events.csv", 200)
    job_id = await cluster.submit(
        windowed_count_graph(tmp_path / "events.csv", tmp_path / "out")
    )
    await wait_job(cluster, job_id, pb.JOB_FINISHED)
    expected: dict[tuple[str, int], int] = {}
    for event in events:
        window = (event["user"], event["ts"] - event["ts"] % 100)
        expected[window] = expected.get(window, 0) + 1
    fired: dict[tuple[str, int], int] = {}
    for index in range(2):
        text = (tmp_path / f"out-{index}").read_text()
        for row in map(json.loads, text.splitlines()):
            window = (row["key"], row["window_start"])
            assert window not in fired, f"window {window} fired twice"
            fired[window] = row["value"]
    assert fired == expected
    # Every subtask ran on this worker, so records never left the process.
    assert one_worker.exchange is not None
    assert one_worker.exchange.streams_opened == 0


@pytest.mark.coordinator(**FAILOVER)
async def test_aligned_recovery_keeps_sums_exact(
    cluster: Cluster, workers: list[Worker], tmp_path: Path
) -> None:
    # Two sources feed every sum subtask, so its barriers must be aligned;
    # a record counted on both sides of a checkpoint would inflate a sum.
    events = write_events(tmp_path / "events.csv", 400)
    graph = keyed_sum_graph(tmp_path / "events.csv", tmp_path / "out", delay_ms=2)
    job_id = await cluster.submit(graph)
    await cluster.wait(lambda s: len(completed_checkpoints(s, job_id)) >= 2)
    await workers[0].stop()
    await cluster.wait(lambda s: s.jobs[job_id].restarts >= 1)
    await wait_job(cluster, job_id, pb.JOB_FINISHED, timeout=30)
    assert read_upsert_outputs(tmp_path / "out", 2) == expected_sums(events)
