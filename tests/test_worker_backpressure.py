"""A slow sink in a worker process holds back a fast source in this process,
so the records between them stay bounded by the credits."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from protos import jobledger_events_pb2 as pb
from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc
from tests.helpers.coordinator_process import REPO_ROOT, coordinator_command
from tests.worker_helpers.fake_coordinator import FakeCoordinator
from tests.worker_helpers.jobs import write_events
from worker.exchange import DEFAULT_BUFFERS
from worker.server import Worker, WorkerConfig
from worker.writer import DEFAULT_BATCH_SIZE

EPOCH = (("jobledger-leader-epoch", "1"),)
ROWS = 40_000
SLOW = "tm-slow"


class Pair:
    """A stand-in coordinator, a worker here and a worker process."""

    def __init__(
        self, coordinator: FakeCoordinator, fast: Worker, slow_endpoint: str
    ) -> None:
        self.coordinator = coordinator
        self.fast = fast
        self.slow_endpoint = slow_endpoint

    def sink_records_in(self) -> int:
        """Return the records the sink had read at the slow worker's last heartbeat."""
        for heartbeat in reversed(self.coordinator.heartbeats):
            if heartbeat.task_manager_id == SLOW:
                for metric in heartbeat.task_metrics:
                    if metric.task_id == "sink_0":
                        return int(metric.records_in)
        return 0


async def start_slow_worker(
    coordinator: FakeCoordinator, tmp_path: Path
) -> asyncio.subprocess.Process:
    command = [
        *coordinator_command(),
        "worker",
        "--coordinator",
        f"127.0.0.1:{coordinator.port}",
        "--state-dir",
        str(tmp_path / SLOW),
        "--id",
        SLOW,
        "--heartbeat-interval",
        "0.05",
    ]
    with (tmp_path / f"{SLOW}.log").open("wb") as log:
        return await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    coordinator = FakeCoordinator()
    await coordinator.start()
    slow = await start_slow_worker(coordinator, tmp_path)
    fast = Worker(
        WorkerConfig(
            coordinators=[f"127.0.0.1:{coordinator.port}"],
            state_dir=str(tmp_path / "tm-fast"),
            task_manager_id="tm-fast",
            heartbeat_interval_s=0.5,
        )
    )
    try:
        await fast.start()
        await coordinator.wait_for(
            lambda f: any(r.task_manager_id == SLOW for r in f.registrations), 30
        )
        (registration,) = [
            r for r in coordinator.registrations if r.task_manager_id == SLOW
        ]
        yield Pair(coordinator, fast, f"{registration.address}:{registration.port}")
    finally:
        slow.send_signal(signal.SIGKILL)
        await slow.wait()
        await fast.stop()
        await coordinator.stop()


def source_descriptor(
    tmp_path: Path, sink_endpoint: str
) -> fpb.TaskDeploymentDescriptor:
    return fpb.TaskDeploymentDescriptor(
        job_graph_job_id="job-1",
        job_vertex_id="src",
        attempt=1,
        parallelism=1,
        fully_qualified_operator_name="jobledger.source.csv",
        operator_configuration=json.dumps(
            {"path": str(tmp_path / "events.csv")}
        ).encode(),
        outputs=[
            fpb.OperatorOutput(
                target_vertex_id="sink",
                target_task_endpoint=sink_endpoint,
                target_specific_subtask_index=0,
            )
        ],
    )


def sink_descriptor(tmp_path: Path) -> fpb.TaskDeploymentDescriptor:
    return fpb.TaskDeploymentDescriptor(
        job_graph_job_id="job-1",
        job_vertex_id="sink",
        attempt=1,
        parallelism=1,
        fully_qualified_operator_name="jobledger.map",
        operator_configuration=json.dumps(
            {"function": "tests.worker_helpers.functions:slow_identity"}
        ).encode(),
        inputs=[fpb.OperatorInput(upstream_job_vertex_id="src")],
        chained_operator_info=[
            fpb.ChainedOperatorInfo(
                fully_qualified_operator_name="jobledger.sink.file",
                operator_configuration=json.dumps(
                    {"path": str(tmp_path / "out.jsonl")}
                ).encode(),
            )
        ],
    )


def finished(coordinator: FakeCoordinator) -> list[str]:
    return sorted(
        r.job_vertex_id
        for r in coordinator.of("UpdateTaskStatus")
        if r.status == pb.TASK_FINISHED
    )


async def test_slow_sink_bounds_sender(pair: Pair, tmp_path: Path) -> None:
    write_events(tmp_path / "events.csv", ROWS)
    async with grpc.aio.insecure_channel(pair.slow_endpoint) as channel:
        stub = fpb_grpc.TaskExecutionStub(channel)
        reply = await stub.DeployTask(sink_descriptor(tmp_path), metadata=EPOCH)
        assert reply.success, reply.message
    assert pair.fast.runtime is not None
    assert (
        await pair.fast.runtime.deploy(source_descriptor(tmp_path, pair.slow_endpoint))
        is None
    )
    (source,) = pair.fast.runtime.tasks.values()

    # Between the source's writer and the sink's operators: at most two
    # batches queued in the writer, one per credit (in flight or in the
    # input channel), and the one the sink's gate is reading. The sink's
    # count comes from heartbeats, which lag while the sink blocks its event
    # loop; 6,000 records is about 0.8 s of the sink's reading. Without
    # credits the source ran nearly all of its records ahead.
    bound = (DEFAULT_BUFFERS + 3) * DEFAULT_BATCH_SIZE + 6_000
    assert 3 * bound < ROWS, "the job must be longer than the bound it checks"
    max_ahead = 0
    async with asyncio.timeout(90):
        while finished(pair.coordinator) != ["sink", "src"]:
            ahead = source.writer.records_out - pair.sink_records_in()
            max_ahead = max(max_ahead, ahead)
            await asyncio.sleep(0.005)
    assert 0 < max_ahead <= bound
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == ROWS
