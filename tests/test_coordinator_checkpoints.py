"""Checkpoint coordination over real gRPC: expiry, late and duplicate
reports, the failure tolerance, retention, ids and fencing metadata."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coordinator.config import FixedDelayRestart
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobmanager_internal_pb2 as fpb
from tests.fake_worker import FakeWorker
from tests.harness import Cluster

FAST_RESTART = FixedDelayRestart(attempts=2, delay_s=0.1)


# ------------------------------------------------------------------ helpers


class HangingTriggerWorker(FakeWorker):
    """A fake worker whose TriggerTaskCheckpoint handler does not return for a
    minute; ``open_triggers`` contains the checkpoint ids still in flight."""

    def __init__(self, task_manager_id: str) -> None:
        super().__init__(task_manager_id)
        self.trigger_delay_s = 60.0
        self.open_triggers: set[int] = set()

    async def TriggerTaskCheckpoint(
        self, request: fpb.TriggerCheckpointRequest, context: Any
    ) -> fpb.TriggerCheckpointResponse:
        self.open_triggers.add(request.checkpoint_id)
        try:
            return await super().TriggerTaskCheckpoint(request, context)
        finally:
            self.open_triggers.discard(request.checkpoint_id)


async def register(cluster: Cluster, worker: FakeWorker, slots: int = 4) -> None:
    """Start a fake worker and register it, as ``Cluster.add_worker`` does."""
    await worker.start()
    cluster.workers[worker.task_manager_id] = worker
    await cluster.tm.RegisterTaskManager(
        fpb.RegisterTaskManagerRequest(
            task_manager_id=worker.task_manager_id,
            address="127.0.0.1",
            port=worker.port,
            slots=slots,
            incarnation=1,
        )
    )


async def running_job(cluster: Cluster) -> tuple[FakeWorker, str]:
    worker = await cluster.add_worker("tm-1")
    job_id = await cluster.submit()
    await cluster.wait_running(job_id)
    return worker, job_id


async def request_checkpoint(cluster: Cluster, job_id: str) -> int:
    reply = await cluster.jm.RequestCheckpoint(
        fpb.RequestCheckpointRequest(job_id=job_id)
    )
    (checkpoint_id,) = reply.checkpoint_ids
    return int(checkpoint_id)


async def complete_checkpoint(cluster: Cluster, job_id: str) -> int:
    checkpoint_id = await request_checkpoint(cluster, job_id)
    await cluster.ack_all(job_id, checkpoint_id)
    await cluster.wait(
        lambda s: s.checkpoints[checkpoint_id].status == pb.CHECKPOINT_COMPLETED
    )
    return checkpoint_id


def decline_request(
    job_id: str, checkpoint_id: int, vertex_id: str = "map"
) -> fpb.ReportFailedCheckpointRequest:
    return fpb.ReportFailedCheckpointRequest(
        job_id=job_id,
        checkpoint_id=checkpoint_id,
        job_vertex_id=vertex_id,
        subtask_index=0,
        failure_reason="state backend full",
        task_manager_id="tm-1",
    )


def task_acks(
    cluster: Cluster, job_id: str, checkpoint_id: int, handle: str
) -> list[fpb.AcknowledgeCheckpointRequest]:
    """Build one acknowledgement per task of the job, in task id order."""
    return [
        fpb.AcknowledgeCheckpointRequest(
            job_id=job_id,
            checkpoint_id=checkpoint_id,
            task_manager_id=task.task_manager_id,
            job_vertex_id=task.job_vertex_id,
            subtask_index=task.subtask_index,
            snapshot_handle=f"{handle}-{tid}",
        )
        for tid, task in sorted(cluster.state.jobs[job_id].tasks.items())
    ]


# ------------------------------------------------------------------ expiry


@pytest.mark.coordinator(
    checkpoints={"interval_s": 0.2, "timeout_s": 0.5, "tolerable_failed": 10}
)
async def test_expiry_with_trigger_outstanding(cluster: Cluster) -> None:
    worker = HangingTriggerWorker("tm-1")
    await register(cluster, worker)
    job_id = await cluster.submit()
    await cluster.wait_running(job_id)
    first, second = (await worker.wait_for("TriggerTaskCheckpoint", 2))[:2]
    # The first trigger call is still open, so only the expiry freed the
    # single concurrent checkpoint slot.
    assert first.checkpoint_id in worker.open_triggers
    expired = cluster.state.checkpoints[first.checkpoint_id]
    assert expired.status == pb.CHECKPOINT_FAILED
    assert expired.failure == pb.CHECKPOINT_EXPIRED
    assert "expired after 0.5 s" in expired.failure_message
    assert second.checkpoint_id == first.checkpoint_id + 1
    follower = cluster.state.checkpoints[second.checkpoint_id]
    assert not follower.manual
    assert follower.triggered_ms >= expired.finished_ms
    aborted = await worker.wait_for("NotifyCheckpointAborted")
    assert aborted[0].checkpoint_id == first.checkpoint_id
    assert cluster.state.jobs[job_id].status == pb.JOB_RUNNING


# ----------------------------------------------------------- late and duplicate reports


@pytest.mark.coordinator(checkpoints={"tolerable_failed": 1})
async def test_ack_after_decline_late(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    await cluster.jm.ReportFailedCheckpoint(decline_request(job_id, checkpoint_id))
    applied = cluster.state.applied_seq
    acks = task_acks(cluster, job_id, checkpoint_id, "late")
    for _ in range(2):
        for ack in acks:
            reply = await cluster.tm.AcknowledgeCheckpoint(ack)
            assert not reply.success, ack.job_vertex_id
    assert cluster.state.applied_seq == applied
    checkpoint = cluster.state.checkpoints[checkpoint_id]
    assert checkpoint.status == pb.CHECKPOINT_FAILED
    assert checkpoint.failure == pb.CHECKPOINT_DECLINED
    assert len(checkpoint.acknowledgements) == 0
    job = cluster.state.jobs[job_id]
    assert job.latest_completed_checkpoint_id == 0
    discards = await worker.wait_for("DiscardSnapshots", 2 * len(acks))
    released = sorted(h for d in discards for h in d.snapshot_handles)
    assert released == sorted(2 * [a.snapshot_handle for a in acks])
    assert worker.of("NotifyCheckpointComplete") == []


@pytest.mark.coordinator(checkpoints={"tolerable_failed": 1})
async def test_stale_failure_after_completion(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    failed = await request_checkpoint(cluster, job_id)
    await cluster.jm.ReportFailedCheckpoint(decline_request(job_id, failed))
    assert cluster.state.jobs[job_id].failed_checkpoints_in_row == 1
    completed = await complete_checkpoint(cluster, job_id)
    for vertex_id in ("sink", "sink"):
        reply = await cluster.jm.ReportFailedCheckpoint(
            decline_request(job_id, failed, vertex_id)
        )
        assert reply.acknowledged
    job = cluster.state.jobs[job_id]
    assert job.status == pb.JOB_RUNNING
    assert job.restarts == 0
    assert job.failed_checkpoints_in_row == 0
    assert job.latest_completed_checkpoint_id == completed
    assert cluster.state.checkpoints[failed].status == pb.CHECKPOINT_FAILED
    await asyncio.sleep(0.2)
    assert worker.of("CancelTask") == []
    assert len(worker.of("DeployTask")) == 3


@pytest.mark.coordinator(checkpoints={"max_concurrent": 2})
async def test_subsumed_failure_not_counted(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    older = await request_checkpoint(cluster, job_id)
    newer = await request_checkpoint(cluster, job_id)
    await cluster.ack_all(job_id, newer)
    await cluster.wait(lambda s: s.checkpoints[newer].status == pb.CHECKPOINT_COMPLETED)
    subsumed = cluster.state.checkpoints[older]
    assert subsumed.status == pb.CHECKPOINT_FAILED
    assert subsumed.failure == pb.CHECKPOINT_ABORTED
    assert f"subsumed by checkpoint {newer}" in subsumed.failure_message
    for _ in range(2):
        await cluster.jm.ReportFailedCheckpoint(decline_request(job_id, older))
    job = cluster.state.jobs[job_id]
    assert job.status == pb.JOB_RUNNING
    assert job.failed_checkpoints_in_row == 0
    assert job.restarts == 0


async def test_duplicate_ack_completes_once(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    acks = task_acks(cluster, job_id, checkpoint_id, "dup")
    for ack in acks:
        await cluster.tm.AcknowledgeCheckpoint(ack)
    await cluster.wait(
        lambda s: s.checkpoints[checkpoint_id].status == pb.CHECKPOINT_COMPLETED
    )
    applied = cluster.state.applied_seq
    for ack in acks:
        reply = await cluster.tm.AcknowledgeCheckpoint(ack)
        assert reply.success
    assert cluster.state.applied_seq == applied
    await worker.wait_for("NotifyCheckpointComplete")
    await asyncio.sleep(0.2)
    assert len(worker.of("NotifyCheckpointComplete")) == 1
    assert worker.of("DiscardSnapshots") == []


# -------------------------------------------------------- heartbeats around checkpoints


async def heartbeat_until(cluster: Cluster, tm_id: str, deadline: float) -> list[bool]:
    """Send SendHeartbeat every 0.2 s until the loop time ``deadline``."""
    loop = asyncio.get_running_loop()
    replies = []
    while loop.time() < deadline:
        reply = await cluster.tm.SendHeartbeat(
            fpb.HeartbeatRequest(task_manager_id=tm_id, incarnation=1)
        )
        replies.append(reply.acknowledged)
        await asyncio.sleep(0.2)
    return replies


@pytest.mark.coordinator(heartbeat_timeout_s=1.5)
async def test_reregistration_resets_heartbeat_deadline(cluster: Cluster) -> None:
    loop = asyncio.get_running_loop()
    registered_at = loop.time()
    worker, job_id = await running_job(cluster)
    await asyncio.sleep(1.0)
    await cluster.tm.RegisterTaskManager(
        fpb.RegisterTaskManagerRequest(
            task_manager_id="tm-1",
            address="127.0.0.1",
            port=worker.port,
            slots=4,
            incarnation=1,
        )
    )
    # Past the first registration's deadline (1.5 s) plus one pass of the
    # once-a-second heartbeat check.
    replies = await heartbeat_until(cluster, "tm-1", registered_at + 3.5)
    assert replies
    assert all(replies)
    tm = cluster.state.task_managers["tm-1"]
    assert tm.status == pb.TASK_MANAGER_ALIVE
    assert tm.registration_id == 2
    job = cluster.state.jobs[job_id]
    assert job.status == pb.JOB_RUNNING
    assert job.restarts == 0
    assert all(t.attempt == 1 for t in job.tasks.values())


# -------------------------------------------------------------- tolerance and retention


@pytest.mark.coordinator(restart=FAST_RESTART)
async def test_exceeding_tolerance_fails_over(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    await cluster.jm.ReportFailedCheckpoint(decline_request(job_id, checkpoint_id))
    await cluster.wait(
        lambda s: (
            s.jobs[job_id].restarts == 1
            and s.jobs[job_id].status == pb.JOB_RUNNING
            and all(t.status == pb.TASK_RUNNING for t in s.jobs[job_id].tasks.values())
        )
    )
    job = cluster.state.jobs[job_id]
    assert "1 checkpoints failed in a row, more than the 0 tolerated" in (
        job.failure_reason
    )
    assert job.failed_checkpoints_in_row == 0
    assert all(t.attempt == 2 for t in job.tasks.values())
    redeployed = [d for d in worker.of("DeployTask") if d.attempt == 2]
    assert len(redeployed) == 3


@pytest.mark.coordinator(restart=FAST_RESTART)
async def test_rejected_trigger_not_counted(cluster: Cluster) -> None:
    # A worker whose sources finished replies that no source runs there:
    # with a tolerance of 0 that must not fail the job over.
    worker, job_id = await running_job(cluster)
    worker.trigger_accepted = False
    checkpoint_id = await request_checkpoint(cluster, job_id)
    await cluster.wait(
        lambda s: s.checkpoints[checkpoint_id].status == pb.CHECKPOINT_FAILED
    )
    checkpoint = cluster.state.checkpoints[checkpoint_id]
    assert checkpoint.failure == pb.CHECKPOINT_ABORTED
    assert "no source of the job runs there" in checkpoint.failure_message
    job = cluster.state.jobs[job_id]
    assert job.status == pb.JOB_RUNNING
    assert job.restarts == 0
    assert job.failed_checkpoints_in_row == 0


@pytest.mark.coordinator(checkpoints={"tolerable_failed": 1}, restart=FAST_RESTART)
async def test_within_tolerance_keeps_running(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    await cluster.jm.ReportFailedCheckpoint(decline_request(job_id, checkpoint_id))
    job = cluster.state.jobs[job_id]
    assert job.status == pb.JOB_RUNNING
    assert job.failed_checkpoints_in_row == 1
    second = await request_checkpoint(cluster, job_id)
    await cluster.jm.ReportFailedCheckpoint(decline_request(job_id, second))
    await cluster.wait(lambda s: s.jobs[job_id].restarts == 1)


@pytest.mark.coordinator(checkpoints={"retained": 1})
async def test_retained_count_discards_older(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    first = await complete_checkpoint(cluster, job_id)
    first_handles = sorted(
        a.snapshot_handle
        for a in cluster.state.checkpoints[first].acknowledgements.values()
    )
    second = await complete_checkpoint(cluster, job_id)
    assert cluster.state.checkpoints[first].status == pb.CHECKPOINT_DISCARDED
    assert cluster.state.checkpoints[second].status == pb.CHECKPOINT_COMPLETED
    (discard,) = await worker.wait_for("DiscardSnapshots")
    assert sorted(discard.snapshot_handles) == first_handles
    listed = await cluster.admin.ListCheckpoints(
        svc.ListCheckpointsRequest(job_id=job_id)
    )
    statuses = {c.checkpoint_id: c.status for c in listed.checkpoints}
    assert statuses == {
        first: pb.CHECKPOINT_DISCARDED,
        second: pb.CHECKPOINT_COMPLETED,
    }


@pytest.mark.coordinator(checkpoints={"retained": 2})
async def test_retained_two_keeps_two(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    ids = [await complete_checkpoint(cluster, job_id) for _ in range(3)]
    statuses = [cluster.state.checkpoints[cid].status for cid in ids]
    assert statuses == [
        pb.CHECKPOINT_DISCARDED,
        pb.CHECKPOINT_COMPLETED,
        pb.CHECKPOINT_COMPLETED,
    ]
    (discard,) = await worker.wait_for("DiscardSnapshots")
    assert all(h.startswith(f"h-{ids[0]}-") for h in discard.snapshot_handles)


# ------------------------------------------------------------------ ids and fencing


async def test_checkpoint_ids_unique_across_jobs(cluster: Cluster) -> None:
    await cluster.add_worker("tm-1")
    first = await cluster.submit()
    second = await cluster.submit()
    await cluster.wait_running(first)
    await cluster.wait_running(second)
    issued = [
        await complete_checkpoint(cluster, first),
        await complete_checkpoint(cluster, second),
    ]
    both = await cluster.jm.RequestCheckpoint(fpb.RequestCheckpointRequest())
    issued += both.checkpoint_ids
    assert issued == sorted(issued)
    assert len(set(issued)) == len(issued)
    owners = {cid: cluster.state.checkpoints[cid].job_id for cid in issued}
    assert {owners[cid] for cid in both.checkpoint_ids} == {first, second}
    assert cluster.state.last_checkpoint_id == max(issued)


@pytest.mark.coordinator(checkpoints={"interval_s": 0.1, "max_concurrent": 1})
async def test_periodic_ids_ascend_across_jobs(cluster: Cluster) -> None:
    worker = await cluster.add_worker("tm-1")
    first = await cluster.submit()
    second = await cluster.submit()
    await cluster.wait_running(first)
    await cluster.wait_running(second)
    triggers = await worker.wait_for("TriggerTaskCheckpoint", 2)
    for trigger in triggers[:2]:
        await cluster.ack_all(trigger.job_id, trigger.checkpoint_id)
    triggers = await worker.wait_for("TriggerTaskCheckpoint", 4)
    ids = [t.checkpoint_id for t in triggers]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert {t.job_id for t in triggers} == {first, second}


@pytest.mark.coordinator(restart=FAST_RESTART, checkpoints={"retained": 1})
async def test_worker_calls_carry_epoch(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    await complete_checkpoint(cluster, job_id)
    await complete_checkpoint(cluster, job_id)
    await request_checkpoint(cluster, job_id)
    await cluster.admin.CancelJob(svc.CancelJobRequest(job_id=job_id))
    await worker.wait_for("CancelTask", 3)
    await worker.wait_for("NotifyCheckpointAborted")
    await worker.wait_for("DiscardSnapshots")
    await worker.wait_for("NotifyCheckpointComplete", 2)
    epoch = cluster.state.epoch
    assert epoch >= 1
    methods = {call.method for call in worker.calls}
    assert methods == {
        "DeployTask",
        "TriggerTaskCheckpoint",
        "NotifyCheckpointComplete",
        "NotifyCheckpointAborted",
        "CancelTask",
        "DiscardSnapshots",
    }
    for call in worker.calls:
        assert call.epoch == epoch, call.method
    for trigger in worker.of("TriggerTaskCheckpoint"):
        assert trigger.job_manager_id == cluster.state.leader_id
