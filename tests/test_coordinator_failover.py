"""Failover over real gRPC: lost workers, the restart strategy, and jobs
that wait for slots."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from coordinator.config import FixedDelayRestart
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobmanager_internal_pb2 as fpb
from tests.harness import Cluster, pipeline

# ------------------------------------------------------------------ helpers


@contextlib.asynccontextmanager
async def heartbeats(cluster: Cluster, alive: set[str]) -> AsyncIterator[None]:
    """Send SendHeartbeat every 0.2 s for each id in ``alive`` until the
    block ends. Removing an id from the set lets that worker go silent."""

    async def beat() -> None:
        while True:
            for tm_id in sorted(alive):
                await cluster.tm.SendHeartbeat(
                    fpb.HeartbeatRequest(task_manager_id=tm_id, incarnation=1)
                )
            await asyncio.sleep(0.2)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def complete_checkpoint(cluster: Cluster, job_id: str) -> int:
    reply = await cluster.jm.RequestCheckpoint(
        fpb.RequestCheckpointRequest(job_id=job_id)
    )
    checkpoint_id = int(reply.checkpoint_ids[0])
    await cluster.ack_all(job_id, checkpoint_id)
    await cluster.wait(
        lambda s: s.checkpoints[checkpoint_id].status == pb.CHECKPOINT_COMPLETED
    )
    return checkpoint_id


async def fail_task(cluster: Cluster, job_id: str, tid: str) -> None:
    """Report the task's current attempt as failed, as its worker would."""
    task = cluster.state.jobs[job_id].tasks[tid]
    reply = await cluster.reporting.UpdateTaskStatus(
        svc.UpdateTaskStatusRequest(
            job_id=job_id,
            job_vertex_id=task.job_vertex_id,
            subtask_index=task.subtask_index,
            attempt=task.attempt,
            status=pb.TASK_FAILED,
            reason="division by zero",
            task_manager_id=task.task_manager_id,
        )
    )
    assert reply.acknowledged


async def wait_attempt(cluster: Cluster, job_id: str, attempt: int) -> None:
    await cluster.wait(
        lambda s: (
            s.jobs[job_id].status == pb.JOB_RUNNING
            and all(
                t.attempt == attempt and t.status == pb.TASK_RUNNING
                for t in s.jobs[job_id].tasks.values()
            )
        )
    )


# ------------------------------------------------------------------ lost workers


@pytest.mark.coordinator(
    heartbeat_timeout_s=1.0,
    heartbeat_interval_s=0.2,
    restart=FixedDelayRestart(attempts=2, delay_s=0.1),
)
async def test_silent_worker_lost_job_recovers(cluster: Cluster) -> None:
    alive = {"tm-1"}
    async with heartbeats(cluster, alive):
        lost = await cluster.add_worker("tm-1", slots=2)
        job_id = await cluster.submit()
        await cluster.wait_running(job_id)
        spare = await cluster.add_worker("tm-2", slots=2)
        alive.add("tm-2")
        checkpoint_id = await complete_checkpoint(cluster, job_id)
        alive.discard("tm-1")
        await cluster.wait(
            lambda s: s.task_managers["tm-1"].status == pb.TASK_MANAGER_LOST
        )
        await wait_attempt(cluster, job_id, 2)
        state = cluster.state
        assert "heartbeat timeout" in state.task_managers["tm-1"].lost_reason
        assert state.task_managers["tm-2"].status == pb.TASK_MANAGER_ALIVE
        job = state.jobs[job_id]
        assert job.restarts == 1
        assert "task manager tm-1 lost" in job.failure_reason
        assert job.restore_checkpoint_id == checkpoint_id
        assert all(t.task_manager_id == "tm-2" for t in job.tasks.values())
        redeployed = spare.of("DeployTask")
        assert len(redeployed) == 3
        for descriptor in redeployed:
            tid = f"{descriptor.job_vertex_id}_{descriptor.subtask_index}"
            assert descriptor.attempt == 2
            assert descriptor.is_recovery
            assert descriptor.recovery_checkpoint_id == checkpoint_id
            assert descriptor.recovery_snapshot_handle == f"h-{checkpoint_id}-{tid}"
            assert dict(descriptor.recovery_source_offsets) == {"offset": checkpoint_id}
        assert all(d.attempt == 1 for d in lost.of("DeployTask"))
        reply = await cluster.tm.SendHeartbeat(
            fpb.HeartbeatRequest(task_manager_id="tm-1", incarnation=1)
        )
        assert not reply.acknowledged


@pytest.mark.coordinator(
    heartbeat_timeout_s=1.0, restart=FixedDelayRestart(attempts=2, delay_s=0.1)
)
async def test_lost_worker_without_checkpoint(cluster: Cluster) -> None:
    alive = {"tm-1"}
    async with heartbeats(cluster, alive):
        await cluster.add_worker("tm-1", slots=1)
        job_id = await cluster.submit()
        await cluster.wait_running(job_id)
        spare = await cluster.add_worker("tm-2", slots=1)
        alive.add("tm-2")
        alive.discard("tm-1")
        await wait_attempt(cluster, job_id, 2)
        redeployed = spare.of("DeployTask")
        assert len(redeployed) == 3
        assert all(not d.is_recovery for d in redeployed)
        assert all(d.recovery_checkpoint_id == 0 for d in redeployed)


@pytest.mark.coordinator(restart=FixedDelayRestart(attempts=2, delay_s=0.1))
async def test_deploy_failure_restarts_job(cluster: Cluster) -> None:
    worker = await cluster.add_worker("tm-1")
    worker.deploy_ok = False
    job_id = await cluster.submit()
    await cluster.wait(lambda s: s.jobs[job_id].failover_attempts == 1)
    worker.deploy_ok = True
    await wait_attempt(cluster, job_id, 2)
    job = cluster.state.jobs[job_id]
    assert "deployment failed: operator not found" in job.failure_reason
    assert job.restarts == 1


# ------------------------------------------------------------------ restart strategy


@pytest.mark.coordinator(restart=FixedDelayRestart(attempts=1, delay_s=0.1))
async def test_fixed_delay_exhausted_fails_job(cluster: Cluster) -> None:
    worker = await cluster.add_worker("tm-1")
    job_id = await cluster.submit()
    await cluster.wait_running(job_id)
    await fail_task(cluster, job_id, "map_0")
    await wait_attempt(cluster, job_id, 2)
    await fail_task(cluster, job_id, "map_0")
    await cluster.wait(lambda s: s.jobs[job_id].status == pb.JOB_FAILED)
    job = cluster.state.jobs[job_id]
    assert "the restart strategy allows no more restarts" in job.failure_reason
    assert "division by zero" in job.failure_reason
    assert job.restarts == 1
    assert job.restart_at_ms == 0
    assert all(
        t.status in (pb.TASK_FAILED, pb.TASK_CANCELED) for t in job.tasks.values()
    )

    # Several restart delays later the job is still failed, and nothing
    # brings it back: not a new worker, not a task report, not a recovery.
    await asyncio.sleep(0.5)
    await cluster.add_worker("tm-2")
    assert cluster.state.jobs[job_id].status == pb.JOB_FAILED
    task = cluster.state.jobs[job_id].tasks["src_0"]
    reply = await cluster.reporting.UpdateTaskStatus(
        svc.UpdateTaskStatusRequest(
            job_id=job_id,
            job_vertex_id="src",
            subtask_index=0,
            attempt=task.attempt,
            status=pb.TASK_RUNNING,
        )
    )
    assert not reply.acknowledged
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.RequestRecovery(fpb.RequestRecoveryRequest(job_id=job_id))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert max(d.attempt for d in worker.of("DeployTask")) == 2
    assert cluster.workers["tm-2"].of("DeployTask") == []
    assert cluster.state.jobs[job_id].status == pb.JOB_FAILED
    overview = await cluster.admin.GetOverview(svc.GetOverviewRequest())
    assert overview.jobs_failed == 1
    assert overview.slots_free == 8


@pytest.mark.coordinator(restart=FixedDelayRestart(attempts=0, delay_s=0.1))
async def test_fixed_delay_zero_attempts(cluster: Cluster) -> None:
    await cluster.add_worker("tm-1")
    job_id = await cluster.submit()
    await cluster.wait_running(job_id)
    await fail_task(cluster, job_id, "sink_0")
    job = cluster.state.jobs[job_id]
    assert job.status == pb.JOB_FAILED
    assert job.restarts == 0


# ------------------------------------------------------------------ waiting for slots


async def test_job_waits_for_slots(cluster: Cluster) -> None:
    first = await cluster.add_worker("tm-1", slots=1)
    job_id = await cluster.submit(pipeline(2))
    job = cluster.state.jobs[job_id]
    assert job.status == pb.JOB_CREATED
    assert all(t.status == pb.TASK_CREATED for t in job.tasks.values())
    assert all(t.task_manager_id == "" for t in job.tasks.values())
    await asyncio.sleep(0.2)
    assert first.of("DeployTask") == []
    second = await cluster.add_worker("tm-2", slots=1)
    await cluster.wait_running(job_id)
    placed = {
        tid: t.task_manager_id for tid, t in cluster.state.jobs[job_id].tasks.items()
    }
    assert {placed["src_0"], placed["src_1"]} == {"tm-1", "tm-2"}
    for index in (0, 1):
        hosts = {placed[f"{v}_{index}"] for v in ("src", "map", "sink")}
        assert len(hosts) == 1, f"subtask {index} is split across {hosts}"
    assert len(first.of("DeployTask")) == 3
    assert len(second.of("DeployTask")) == 3


async def test_jobs_scheduled_oldest_first(cluster: Cluster) -> None:
    older = await cluster.submit(pipeline(1, name="older"))
    newer = await cluster.submit(pipeline(1, name="newer"))
    await cluster.add_worker("tm-1", slots=1)
    await cluster.wait_running(older)
    assert cluster.state.jobs[newer].status == pb.JOB_CREATED
    await cluster.admin.CancelJob(svc.CancelJobRequest(job_id=older))
    await cluster.wait_running(newer)
