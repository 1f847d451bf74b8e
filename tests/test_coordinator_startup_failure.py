"""How the coordinator handles a task that cannot start, over real gRPC.

A fake worker fails the deployment of chosen attempts and reports each
failure with ReportTaskStartupFailure before it replies, as a real worker
does. An unrecoverable failure fails the job; any other failure restarts it.
Each test replays the log and compares the job with the live one, and the
``cluster`` fixture compares the whole state at teardown.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import FixedDelayRestart
from protos import jobledger_events_pb2 as pb
from protos import jobmanager_internal_pb2 as fpb
from tests.fake_worker import FakeWorker
from tests.harness import Cluster, pipeline, replayed_state

FAST_RESTART = FixedDelayRestart(attempts=3, delay_s=0.1)


async def failing_worker(cluster: Cluster, unrecoverable: bool) -> FakeWorker:
    """Register tm-1, which fails attempt 1 of every task and reports it."""
    worker = await cluster.add_worker("tm-1")
    worker.startup_failure_attempts = {1}
    worker.unrecoverable = unrecoverable
    worker.report_startup_failure = cluster.jm.ReportTaskStartupFailure
    return worker


async def assert_job_replays(tmp_path: Path, cluster: Cluster, job_id: str) -> None:
    replayed = await replayed_state(tmp_path / "log.db")
    assert replayed.jobs[job_id] == cluster.state.jobs[job_id]


@pytest.mark.coordinator(restart=FAST_RESTART)
async def test_unrecoverable_startup_fails_job(
    cluster: Cluster, tmp_path: Path
) -> None:
    worker = await failing_worker(cluster, unrecoverable=True)
    job_id = await cluster.submit(pipeline())
    await cluster.wait(lambda s: s.jobs[job_id].status == pb.JOB_FAILED)

    job = cluster.state.jobs[job_id]
    assert job.restarts == 0
    assert job.failover_attempts == 0
    assert "failed: startup failed on tm-1: cannot start op." in job.failure_reason
    assert "the failure is not recoverable" in job.failure_reason
    assert all(
        t.status in (pb.TASK_FAILED, pb.TASK_CANCELED) for t in job.tasks.values()
    )
    assert all(d.attempt == 1 for d in worker.of("DeployTask"))
    await assert_job_replays(tmp_path, cluster, job_id)


@pytest.mark.coordinator(restart=FAST_RESTART)
async def test_recoverable_startup_restarts_job(
    cluster: Cluster, tmp_path: Path
) -> None:
    worker = await failing_worker(cluster, unrecoverable=False)
    job_id = await cluster.submit(pipeline())
    await cluster.wait(
        lambda s: (
            s.jobs[job_id].status == pb.JOB_RUNNING
            and all(t.attempt == 2 for t in s.jobs[job_id].tasks.values())
            and all(t.status == pb.TASK_RUNNING for t in s.jobs[job_id].tasks.values())
        )
    )

    job = cluster.state.jobs[job_id]
    assert job.restarts == 1
    assert job.failover_attempts == 1
    assert "startup failed on tm-1: cannot start op." in job.failure_reason
    assert "not recoverable" not in job.failure_reason
    redeployed = [d for d in worker.of("DeployTask") if d.attempt == 2]
    assert sorted(d.job_vertex_id for d in redeployed) == ["map", "sink", "src"]
    await assert_job_replays(tmp_path, cluster, job_id)


@pytest.mark.coordinator(restart=FAST_RESTART)
async def test_unrecoverable_report_of_old_attempt(cluster: Cluster) -> None:
    # A late report of an attempt that a restart replaced changes nothing.
    await failing_worker(cluster, unrecoverable=False)
    job_id = await cluster.submit(pipeline())
    await cluster.wait(lambda s: s.jobs[job_id].restarts == 1)
    reply = await cluster.jm.ReportTaskStartupFailure(
        fpb.ReportTaskStartupFailureRequest(
            job_id=job_id,
            job_vertex_id="map",
            subtask_index=0,
            failure_reason="late",
            attempt=1,
            unrecoverable=True,
        )
    )
    assert not reply.acknowledged
    assert cluster.state.jobs[job_id].status != pb.JOB_FAILED
