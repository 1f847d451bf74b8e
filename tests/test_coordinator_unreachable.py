"""Workers that a call finds unreachable: the coordinator declares their
registration lost at once instead of waiting for the heartbeat timeout."""

from __future__ import annotations

import pytest

from coordinator import taskmanagers
from coordinator.config import FixedDelayRestart
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobmanager_internal_pb2 as fpb
from tests.harness import Cluster


def running_on(cluster: Cluster, job_id: str, attempt: int, tm_id: str) -> bool:
    job = cluster.state.jobs[job_id]
    return job.status == pb.JOB_RUNNING and all(
        t.attempt == attempt
        and t.status == pb.TASK_RUNNING
        and t.task_manager_id == tm_id
        for t in job.tasks.values()
    )


def lost(cluster: Cluster, tm_id: str) -> bool:
    return cluster.state.task_managers[tm_id].status == pb.TASK_MANAGER_LOST


@pytest.mark.coordinator(restart=FixedDelayRestart(attempts=5, delay_s=0.1))
async def test_refused_deployment_loses_worker(cluster: Cluster) -> None:
    live = await cluster.add_worker("tm-live", slots=1)
    job_id = await cluster.submit()
    await cluster.wait(lambda s: running_on(cluster, job_id, 1, "tm-live"))
    # The dead worker wins the tie for the restart's slot, because its id is
    # the smaller one, so the restart deploys to a stopped server.
    dead = await cluster.add_worker("tm-dead", slots=1)
    await dead.stop()
    await fail_first_task(cluster, job_id)

    await cluster.wait(lambda s: running_on(cluster, job_id, 3, "tm-live"))

    tm = cluster.state.task_managers["tm-dead"]
    assert tm.status == pb.TASK_MANAGER_LOST
    assert "task manager tm-dead" in tm.lost_reason
    assert f"127.0.0.1:{dead.port} is unreachable" in tm.lost_reason
    assert "DeployTask failed with UNAVAILABLE" in tm.lost_reason
    job = cluster.state.jobs[job_id]
    assert job.restarts == 2
    assert "task manager tm-dead lost" in job.failure_reason
    assert dead.of("DeployTask") == []
    assert sorted(d.attempt for d in live.of("DeployTask")) == [1, 1, 1, 3, 3, 3]
    assert cluster.state.task_managers["tm-live"].status == pb.TASK_MANAGER_ALIVE


@pytest.mark.coordinator(restart=FixedDelayRestart(attempts=5, delay_s=0.1))
async def test_refused_trigger_loses_worker(cluster: Cluster) -> None:
    worker = await cluster.add_worker("tm-1", slots=1)
    job_id = await cluster.submit()
    await cluster.wait(lambda s: running_on(cluster, job_id, 1, "tm-1"))
    spare = await cluster.add_worker("tm-2", slots=1)
    await worker.stop()

    reply = await cluster.jm.RequestCheckpoint(
        fpb.RequestCheckpointRequest(job_id=job_id)
    )
    checkpoint_id = int(reply.checkpoint_ids[0])
    await cluster.wait(lambda s: running_on(cluster, job_id, 2, "tm-2"))

    tm = cluster.state.task_managers["tm-1"]
    assert tm.status == pb.TASK_MANAGER_LOST
    assert "TriggerTaskCheckpoint failed with UNAVAILABLE" in tm.lost_reason
    # The loss decided the only failover, and the failover aborted the checkpoint.
    job = cluster.state.jobs[job_id]
    assert job.restarts == 1
    assert "task manager tm-1 lost" in job.failure_reason
    checkpoint = cluster.state.checkpoints[checkpoint_id]
    assert checkpoint.status == pb.CHECKPOINT_FAILED
    assert checkpoint.failure == pb.CHECKPOINT_ABORTED
    assert len(spare.of("DeployTask")) == 3


async def test_unreachable_spares_newer_registration(cluster: Cluster) -> None:
    old = await cluster.add_worker("tm-1", slots=1, incarnation=1)
    old_registration = cluster.state.task_managers["tm-1"].registration_id
    await old.stop()
    await cluster.add_worker("tm-1", slots=1, incarnation=2)
    new_registration = cluster.state.task_managers["tm-1"].registration_id
    assert new_registration > old_registration
    engine = cluster.coordinator.engine
    assert engine is not None
    seq = cluster.state.applied_seq

    # A call decided for the first registration failed after the second one.
    await engine.execute(
        taskmanagers.decide_unreachable,
        "tm-1",
        old_registration,
        "DeployTask",
        "UNAVAILABLE: Connection refused",
    )

    tm = cluster.state.task_managers["tm-1"]
    assert tm.status == pb.TASK_MANAGER_ALIVE
    assert tm.registration_id == new_registration
    assert tm.lost_reason == ""
    assert cluster.state.applied_seq == seq


async def test_unreachable_lost_worker_writes_nothing(cluster: Cluster) -> None:
    worker = await cluster.add_worker("tm-1", slots=1)
    registration = cluster.state.task_managers["tm-1"].registration_id
    await worker.stop()
    engine = cluster.coordinator.engine
    assert engine is not None
    await engine.execute(
        taskmanagers.decide_unreachable,
        "tm-1",
        registration,
        "CancelTask",
        "UNAVAILABLE: Connection refused",
    )
    assert lost(cluster, "tm-1")
    reason = cluster.state.task_managers["tm-1"].lost_reason
    assert "CancelTask failed" in reason
    seq = cluster.state.applied_seq

    # A second call to the same registration fails after it was lost.
    await engine.execute(
        taskmanagers.decide_unreachable,
        "tm-1",
        registration,
        "NotifyCheckpointAborted",
        "UNAVAILABLE: Connection refused",
    )

    assert cluster.state.applied_seq == seq
    assert cluster.state.task_managers["tm-1"].lost_reason == reason


async def fail_first_task(cluster: Cluster, job_id: str) -> None:
    """Report the job's first task as failed, as its worker would."""
    tid, task = sorted(cluster.state.jobs[job_id].tasks.items())[0]
    reply = await cluster.reporting.UpdateTaskStatus(
        svc.UpdateTaskStatusRequest(
            job_id=job_id,
            job_vertex_id=task.job_vertex_id,
            subtask_index=task.subtask_index,
            attempt=task.attempt,
            status=pb.TASK_FAILED,
            reason=f"task {tid} divided by zero",
            task_manager_id=task.task_manager_id,
        )
    )
    assert reply.acknowledged
