"""Worker processes: a clean stop on SIGTERM, and recovery after SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator.config import FixedDelayRestart
from protos import jobledger_events_pb2 as pb
from tests.harness import Cluster
from tests.helpers.coordinator_process import coordinator_command
from tests.worker_helpers.jobs import (
    expected_rolling_sums,
    keyed_sum_graph,
    read_append_outputs,
    write_events,
)

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """A ``jobledger worker`` subprocess."""

    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process = process
        self.name = name

    @classmethod
    async def start(cls, cluster: Cluster, state_dir: Path, name: str) -> WorkerProcess:
        process = await asyncio.create_subprocess_exec(
            *coordinator_command(),
            "worker",
            "--coordinator",
            f"127.0.0.1:{cluster.coordinator.port}",
            "--listen",
            "127.0.0.1:0",
            "--slots",
            "4",
            "--state-dir",
            str(state_dir / name),
            "--id",
            name,
            "--heartbeat-interval",
            "0.2",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        await cluster.wait(
            lambda s: (
                name in s.task_managers
                and s.task_managers[name].status == pb.TASK_MANAGER_ALIVE
            ),
            timeout=20,
        )
        return cls(process, name)

    async def stop(self, signum: int) -> tuple[int, str]:
        """Send ``signum``; return the exit code and standard error."""
        self.process.send_signal(signum)
        async with asyncio.timeout(20):
            _, stderr = await self.process.communicate()
        assert self.process.returncode is not None
        return self.process.returncode, stderr.decode()


@pytest.fixture
async def processes() -> AsyncIterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        if worker.process.returncode is None:
            await worker.stop(signal.SIGKILL)


async def test_sigterm_stops_cleanly(
    cluster: Cluster, processes: list[WorkerProcess], tmp_path: Path
) -> None:
    worker = await WorkerProcess.start(cluster, tmp_path, "tm-a")
    processes.append(worker)
    code, stderr = await worker.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "worker tm-a stopped" in stderr


@pytest.mark.coordinator(
    checkpoints={"interval_s": 0.1},
    heartbeat_interval_s=0.2,
    heartbeat_timeout_s=1.0,
    restart=FixedDelayRestart(attempts=20, delay_s=0.1),
)
async def test_sigkill_recovers_identical_output(
    cluster: Cluster, processes: list[WorkerProcess], tmp_path: Path
) -> None:
    for name in ("tm-a", "tm-b"):
        processes.append(await WorkerProcess.start(cluster, tmp_path, name))
    events = write_events(tmp_path / "events.csv", 500)
    graph = keyed_sum_graph(
        tmp_path / "events.csv",
        tmp_path / "out",
        delay_ms=3,
        mode="append",
        source_parallelism=1,
    )
    job_id = await cluster.submit(graph)
    await cluster.wait(lambda s: s.jobs[job_id].latest_completed_checkpoint_id > 0)
    # Kill the worker of the source, so that it must resume at its offset.
    source_worker = cluster.state.jobs[job_id].tasks["src_0"].task_manager_id
    killed = next(p for p in processes if p.name == source_worker)
    code, _ = await killed.stop(signal.SIGKILL)
    assert code == -signal.SIGKILL
    await cluster.wait(lambda s: s.jobs[job_id].restarts >= 1, timeout=20)
    await cluster.wait(lambda s: s.jobs[job_id].status == pb.JOB_FINISHED, timeout=40)
    assert read_append_outputs(tmp_path / "out", 2) == expected_rolling_sums(events)
