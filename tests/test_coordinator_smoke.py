from __future__ import annotations

import asyncio

import pytest

from eventlog import CompactedError
from protos import jobledger_events_pb2 as pb
from protos import jobmanager_internal_pb2 as fpb
from tests.harness import Cluster


@pytest.mark.coordinator(checkpoints={"retained": 1})
async def test_job_runs_and_checkpoints(cluster: Cluster) -> None:
    worker = await cluster.add_worker("tm-1", slots=2)
    job_id = await cluster.submit()
    await cluster.wait_running(job_id)
    deployed = worker.of("DeployTask")
    assert len(deployed) == 3
    reply = await cluster.jm.RequestCheckpoint(
        fpb.RequestCheckpointRequest(job_id=job_id)
    )
    assert reply.accepted
    (cid,) = reply.checkpoint_ids
    await worker.wait_for("TriggerTaskCheckpoint")
    await cluster.ack_all(job_id, cid)
    await cluster.wait(lambda s: s.checkpoints[cid].status == pb.CHECKPOINT_COMPLETED)
    await worker.wait_for("NotifyCheckpointComplete")


@pytest.mark.coordinator(snapshot_every=5, retain_events=2)
async def test_snapshot_compacts_and_replays(cluster: Cluster) -> None:
    worker = await cluster.add_worker("tm-1", slots=2)
    job_id = await cluster.submit()
    await cluster.wait_running(job_id)
    for _ in range(10):
        await cluster.tm.SendHeartbeat(fpb.HeartbeatRequest(task_manager_id="tm-1"))
    log = cluster.coordinator.log
    async with asyncio.timeout(10):
        while (snapshot := await log.load_snapshot()) is None:
            await asyncio.sleep(0.02)
    assert snapshot.state.jobs[job_id].status == pb.JOB_RUNNING
    with pytest.raises(CompactedError):
        [event async for event in log.read(1)]
    assert worker.of("DeployTask")
