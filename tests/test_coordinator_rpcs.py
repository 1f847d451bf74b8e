"""Success and rejection paths of every coordinator RPC, over real gRPC.

Each test runs against the in-process coordinator of the ``cluster`` fixture,
with fake workers that record what the coordinator calls. At teardown the
fixture replays the log and compares the result with the live state.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable

import grpc
import pytest

from coordinator.config import FixedDelayRestart
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobmanager_internal_pb2 as fpb
from tests.fake_worker import FakeWorker
from tests.harness import Cluster, pipeline, vertex

FAST_RESTART = FixedDelayRestart(attempts=2, delay_s=0.1)


# ------------------------------------------------------------------ helpers


async def running_job(
    cluster: Cluster, parallelism: int = 1, slots: int = 4
) -> tuple[FakeWorker, str]:
    """Register worker tm-1, submit a pipeline and wait until it runs."""
    worker = await cluster.add_worker("tm-1", slots=slots)
    job_id = await cluster.submit(pipeline(parallelism))
    await cluster.wait_running(job_id)
    return worker, job_id


async def request_checkpoint(cluster: Cluster, job_id: str) -> int:
    reply = await cluster.jm.RequestCheckpoint(
        fpb.RequestCheckpointRequest(job_id=job_id)
    )
    (checkpoint_id,) = reply.checkpoint_ids
    return int(checkpoint_id)


async def complete_checkpoint(cluster: Cluster, job_id: str) -> int:
    """Trigger a checkpoint, acknowledge it for every task and wait for it."""
    checkpoint_id = await request_checkpoint(cluster, job_id)
    await cluster.ack_all(job_id, checkpoint_id)
    await cluster.wait(
        lambda s: s.checkpoints[checkpoint_id].status == pb.CHECKPOINT_COMPLETED
    )
    return checkpoint_id


async def wait_attempt(cluster: Cluster, job_id: str, attempt: int) -> None:
    """Wait until every task of the job runs the given attempt."""
    await cluster.wait(
        lambda s: (
            s.jobs[job_id].status == pb.JOB_RUNNING
            and all(
                t.attempt == attempt and t.status == pb.TASK_RUNNING
                for t in s.jobs[job_id].tasks.values()
            )
        )
    )


def ack_request(
    job_id: str,
    checkpoint_id: int,
    vertex_id: str = "src",
    handle: str = "handle",
    task_manager_id: str = "tm-1",
) -> fpb.AcknowledgeCheckpointRequest:
    return fpb.AcknowledgeCheckpointRequest(
        job_id=job_id,
        checkpoint_id=checkpoint_id,
        task_manager_id=task_manager_id,
        job_vertex_id=vertex_id,
        subtask_index=0,
        snapshot_handle=handle,
        source_offsets={"partition-0": 42},
        snapshot_size=7,
        duration=3,
    )


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


def status_request(
    job_id: str, task: pb.TaskState, status: pb.TaskStatus.ValueType, attempt: int = 0
) -> svc.UpdateTaskStatusRequest:
    return svc.UpdateTaskStatusRequest(
        job_id=job_id,
        job_vertex_id=task.job_vertex_id,
        subtask_index=task.subtask_index,
        attempt=attempt or task.attempt,
        status=status,
        task_manager_id=task.task_manager_id,
    )


def register_request(
    tm_id: str = "tm-9", port: int = 7001, incarnation: int = 1, slots: int = 2
) -> fpb.RegisterTaskManagerRequest:
    return fpb.RegisterTaskManagerRequest(
        task_manager_id=tm_id,
        address="127.0.0.1",
        port=port,
        slots=slots,
        incarnation=incarnation,
    )


def handle_of(checkpoint_id: int, tid: str) -> str:
    """Return the snapshot handle ``Cluster.ack_all`` sends for a task."""
    return f"h-{checkpoint_id}-{tid}"


# ------------------------------------------------------------------ SubmitJob


async def test_submit_job_valid(cluster: Cluster) -> None:
    reply = await cluster.jm.SubmitJob(fpb.SubmitJobRequest(job_graph=pipeline(2)))
    assert reply.success
    assert len(reply.job_id) == 32
    assert reply.job_id in reply.message
    job = cluster.state.jobs[reply.job_id]
    assert job.status == pb.JOB_CREATED
    assert sorted(job.tasks) == [
        "map_0",
        "map_1",
        "sink_0",
        "sink_1",
        "src_0",
        "src_1",
    ]
    assert all(t.attempt == 1 for t in job.tasks.values())


def _duplicate_vertex_id(graph: fpb.JobGraph) -> None:
    graph.vertices[1].id = "src"


def _edge_to_missing_vertex(graph: fpb.JobGraph) -> None:
    graph.edges[0].target_vertex_id = "ghost"


def _edge_missing_from_lists(graph: fpb.JobGraph) -> None:
    del graph.vertices[1].input_edge_ids[:]


def _cycle(graph: fpb.JobGraph) -> None:
    graph.vertices[1].output_edge_ids.append("e3")
    graph.vertices[1].input_edge_ids.append("e4")
    graph.vertices.append(vertex("loop", fpb.OPERATOR, inputs=("e3",), outputs=("e4",)))
    graph.edges.append(
        fpb.JobEdge(id="e3", source_vertex_id="map", target_vertex_id="loop")
    )
    graph.edges.append(
        fpb.JobEdge(id="e4", source_vertex_id="loop", target_vertex_id="map")
    )


def _no_source(graph: fpb.JobGraph) -> None:
    graph.vertices[0].vertex_type = fpb.OPERATOR


def _no_sink(graph: fpb.JobGraph) -> None:
    graph.vertices[2].vertex_type = fpb.OPERATOR


def _parallelism_zero(graph: fpb.JobGraph) -> None:
    graph.vertices[1].parallelism = 0


def _parallelism_above_max(graph: fpb.JobGraph) -> None:
    graph.vertices[1].parallelism = 129


INVALID_GRAPHS: list[tuple[Callable[[fpb.JobGraph], None], str]] = [
    (_duplicate_vertex_id, "vertex id 'src' is used twice"),
    (_edge_to_missing_vertex, "names target vertex 'ghost'"),
    (_edge_missing_from_lists, "edge 'e1' is missing from input_edge_ids"),
    (_cycle, "cycle: map -> loop -> map"),
    (_no_source, "no SOURCE vertex"),
    (_no_sink, "no SINK vertex"),
    (_parallelism_zero, "vertex 'map' has parallelism 0"),
    (_parallelism_above_max, "vertex 'map' has parallelism 129"),
]


@pytest.mark.parametrize(
    ("break_graph", "problem"),
    INVALID_GRAPHS,
    ids=[change.__name__.strip("_") for change, _ in INVALID_GRAPHS],
)
async def test_submit_job_invalid_graph(
    cluster: Cluster, break_graph: Callable[[fpb.JobGraph], None], problem: str
) -> None:
    graph = pipeline()
    break_graph(graph)
    applied = cluster.state.applied_seq
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.SubmitJob(fpb.SubmitJobRequest(job_graph=graph))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in (raised.value.details() or "")
    assert len(cluster.state.jobs) == 0
    assert cluster.state.applied_seq == applied


async def test_submit_job_missing_graph(cluster: Cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.SubmitJob(fpb.SubmitJobRequest())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job_graph is missing" in (raised.value.details() or "")
    assert len(cluster.state.jobs) == 0


# ------------------------------------------------------------------ RegisterTaskManager


async def test_register_task_manager_success(cluster: Cluster) -> None:
    reply = await cluster.tm.RegisterTaskManager(register_request(slots=0))
    engine = cluster.coordinator.engine
    assert engine is not None
    assert reply.success
    assert reply.job_manager_id == engine.coordinator_id
    assert reply.leader_epoch == cluster.state.epoch
    assert reply.leader_epoch >= 1
    tm = cluster.state.task_managers["tm-9"]
    assert tm.status == pb.TASK_MANAGER_ALIVE
    assert tm.port == 7001
    assert tm.slots == cluster.coordinator.config.default_slots
    assert tm.registration_id == 1


@pytest.mark.parametrize(
    ("request_fields", "problem"),
    [
        ({"port": 0}, "port 0"),
        ({"port": 70000}, "port 70000"),
        ({"task_manager_id": ""}, "task_manager_id is empty"),
        ({"address": ""}, "address of task manager tm-9 is empty"),
        ({"slots": -1}, "slots -1"),
    ],
    ids=["port-zero", "port-too-large", "empty-id", "empty-address", "slots"],
)
async def test_register_task_manager_invalid(
    cluster: Cluster, request_fields: dict[str, object], problem: str
) -> None:
    request = register_request()
    for name, value in request_fields.items():
        setattr(request, name, value)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.tm.RegisterTaskManager(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in (raised.value.details() or "")
    assert len(cluster.state.task_managers) == 0


async def test_register_task_manager_stale_incarnation(cluster: Cluster) -> None:
    await cluster.tm.RegisterTaskManager(register_request(incarnation=2))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.tm.RegisterTaskManager(register_request(incarnation=1))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "incarnation 1 is stale" in (raised.value.details() or "")
    tm = cluster.state.task_managers["tm-9"]
    assert tm.incarnation == 2
    assert tm.registration_id == 1


@pytest.mark.coordinator(heartbeat_timeout_s=0.5)
async def test_register_stale_incarnation_after_loss(cluster: Cluster) -> None:
    await cluster.tm.RegisterTaskManager(register_request(incarnation=2))
    await cluster.wait(lambda s: s.task_managers["tm-9"].status == pb.TASK_MANAGER_LOST)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.tm.RegisterTaskManager(register_request(incarnation=1))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert cluster.state.task_managers["tm-9"].status == pb.TASK_MANAGER_LOST


@pytest.mark.coordinator(restart=FAST_RESTART)
async def test_register_new_incarnation_fails_over(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    reply = await cluster.tm.RegisterTaskManager(
        register_request("tm-1", port=worker.port, incarnation=2, slots=4)
    )
    assert reply.success
    await wait_attempt(cluster, job_id, 2)
    job = cluster.state.jobs[job_id]
    assert job.restarts == 1
    assert "a new process registered" in job.failure_reason
    tm = cluster.state.task_managers["tm-1"]
    assert tm.incarnation == 2
    assert tm.registration_id == 2
    redeployed = [d for d in worker.of("DeployTask") if d.attempt == 2]
    assert len(redeployed) == 3


async def test_register_same_incarnation_keeps_tasks(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    await cluster.tm.RegisterTaskManager(
        register_request("tm-1", port=worker.port, incarnation=1, slots=4)
    )
    job = cluster.state.jobs[job_id]
    assert job.status == pb.JOB_RUNNING
    assert job.restarts == 0
    assert all(t.status == pb.TASK_RUNNING for t in job.tasks.values())
    assert cluster.state.task_managers["tm-1"].registration_id == 2


# ------------------------------------------------------------------ SendHeartbeat


async def test_send_heartbeat_known(cluster: Cluster) -> None:
    await cluster.add_worker("tm-1")
    reply = await cluster.tm.SendHeartbeat(
        fpb.HeartbeatRequest(task_manager_id="tm-1", incarnation=1)
    )
    assert reply.acknowledged


async def test_send_heartbeat_records_metrics(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    metric = fpb.TaskMetricData(
        task_id="map_0", records_in=11, records_out=9, job_id=job_id
    )
    reply = await cluster.tm.SendHeartbeat(
        fpb.HeartbeatRequest(
            task_manager_id="tm-1", incarnation=1, task_metrics=[metric]
        )
    )
    assert reply.acknowledged
    task = cluster.state.jobs[job_id].tasks["map_0"]
    assert task.records_in == 11
    assert task.records_out == 9


async def test_send_heartbeat_unknown(cluster: Cluster) -> None:
    reply = await cluster.tm.SendHeartbeat(
        fpb.HeartbeatRequest(task_manager_id="tm-unknown", incarnation=1)
    )
    assert not reply.acknowledged


async def test_send_heartbeat_wrong_incarnation(cluster: Cluster) -> None:
    await cluster.add_worker("tm-1", incarnation=3)
    applied = cluster.state.applied_seq
    reply = await cluster.tm.SendHeartbeat(
        fpb.HeartbeatRequest(task_manager_id="tm-1", incarnation=2)
    )
    assert not reply.acknowledged
    assert cluster.state.applied_seq == applied


async def test_send_heartbeat_empty_id(cluster: Cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.tm.SendHeartbeat(fpb.HeartbeatRequest())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------ Heartbeat


async def test_task_heartbeat_records_health(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    reply = await cluster.jm.Heartbeat(
        fpb.JobManagerHeartbeatRequest(
            job_id=job_id, operator_instance_id="map_0", health_status="DEGRADED"
        )
    )
    assert reply.ack
    fetched = await cluster.admin.GetJob(svc.GetJobRequest(job_id=job_id))
    assert fetched.tasks["map_0"].health_status == "DEGRADED"
    assert fetched.tasks["src_0"].health_status == ""


async def test_task_heartbeat_unknown_job(cluster: Cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.Heartbeat(
            fpb.JobManagerHeartbeatRequest(
                job_id="no-such-job", operator_instance_id="map_0", health_status="OK"
            )
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-job" in (raised.value.details() or "")


@pytest.mark.parametrize("operator_instance_id", ["map", "map_x", "_0", ""])
async def test_task_heartbeat_bad_instance_id(
    cluster: Cluster, operator_instance_id: str
) -> None:
    _, job_id = await running_job(cluster)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.Heartbeat(
            fpb.JobManagerHeartbeatRequest(
                job_id=job_id,
                operator_instance_id=operator_instance_id,
                health_status="HEALTHY",
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "operator_instance_id" in (raised.value.details() or "")


async def test_task_heartbeat_unknown_task(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.Heartbeat(
            fpb.JobManagerHeartbeatRequest(
                job_id=job_id, operator_instance_id="map_5", health_status="HEALTHY"
            )
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- AcknowledgeCheckpoint


async def test_acknowledge_checkpoint_accepted(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    reply = await cluster.tm.AcknowledgeCheckpoint(ack_request(job_id, checkpoint_id))
    assert reply.success
    ack = cluster.state.checkpoints[checkpoint_id].acknowledgements["src_0"]
    assert ack.snapshot_handle == "handle"
    assert dict(ack.source_offsets) == {"partition-0": 42}
    assert ack.snapshot_size == 7
    assert ack.task_manager_id == "tm-1"


async def test_acknowledge_checkpoint_completes(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    await cluster.ack_all(job_id, checkpoint_id)
    await cluster.wait(
        lambda s: s.checkpoints[checkpoint_id].status == pb.CHECKPOINT_COMPLETED
    )
    assert cluster.state.jobs[job_id].latest_completed_checkpoint_id == checkpoint_id
    (notified,) = await worker.wait_for("NotifyCheckpointComplete")
    assert notified.checkpoint_id == checkpoint_id
    assert notified.job_id == job_id


async def test_acknowledge_checkpoint_duplicate_ignored(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    await cluster.tm.AcknowledgeCheckpoint(ack_request(job_id, checkpoint_id))
    applied = cluster.state.applied_seq
    reply = await cluster.tm.AcknowledgeCheckpoint(
        ack_request(job_id, checkpoint_id, handle="second-handle")
    )
    assert reply.success
    assert cluster.state.applied_seq == applied
    checkpoint = cluster.state.checkpoints[checkpoint_id]
    assert checkpoint.acknowledgements["src_0"].snapshot_handle == "handle"
    assert checkpoint.status == pb.CHECKPOINT_PENDING


async def test_duplicate_acknowledgement_waits_for_first(cluster: Cluster) -> None:
    # A worker that sends its acknowledgement again, while the first is not
    # durable yet, gets its reply only once the first is: a crash before
    # then could take the first back.
    _, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    blocker = sqlite3.connect(cluster.coordinator.config.db_path, timeout=30)
    try:
        # Held well under the lease, so the leader keeps its lease.
        blocker.execute("BEGIN IMMEDIATE")
        first = asyncio.ensure_future(
            cluster.tm.AcknowledgeCheckpoint(ack_request(job_id, checkpoint_id))
        )
        await asyncio.sleep(0.2)
        assert not first.done()
        again = asyncio.ensure_future(
            cluster.tm.AcknowledgeCheckpoint(ack_request(job_id, checkpoint_id))
        )
        await asyncio.sleep(0.2)
        assert not again.done(), "answered before the first acknowledgement landed"
    finally:
        blocker.rollback()
        blocker.close()
    assert (await first).success
    assert (await again).success


@pytest.mark.coordinator(checkpoints={"tolerable_failed": 1})
async def test_acknowledge_checkpoint_late_after_decline(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    await cluster.jm.ReportFailedCheckpoint(decline_request(job_id, checkpoint_id))
    reply = await cluster.tm.AcknowledgeCheckpoint(
        ack_request(job_id, checkpoint_id, handle="late-handle")
    )
    assert not reply.success
    (discard,) = await worker.wait_for("DiscardSnapshots")
    assert list(discard.snapshot_handles) == ["late-handle"]
    assert len(cluster.state.checkpoints[checkpoint_id].acknowledgements) == 0


@pytest.mark.coordinator(checkpoints={"timeout_s": 0.3, "tolerable_failed": 1})
async def test_acknowledge_checkpoint_late_after_expiry(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    await cluster.wait(
        lambda s: s.checkpoints[checkpoint_id].failure == pb.CHECKPOINT_EXPIRED
    )
    reply = await cluster.tm.AcknowledgeCheckpoint(
        ack_request(job_id, checkpoint_id, handle="expired-handle")
    )
    assert not reply.success
    (discard,) = await worker.wait_for("DiscardSnapshots")
    assert list(discard.snapshot_handles) == ["expired-handle"]


async def test_acknowledge_checkpoint_unknown_id(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.tm.AcknowledgeCheckpoint(ack_request(job_id, 999))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "checkpoint 999 was never triggered" in (raised.value.details() or "")


async def test_acknowledge_checkpoint_other_job(cluster: Cluster) -> None:
    await cluster.add_worker("tm-1")
    first = await cluster.submit()
    second = await cluster.submit()
    await cluster.wait_running(first)
    await cluster.wait_running(second)
    checkpoint_id = await request_checkpoint(cluster, first)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.tm.AcknowledgeCheckpoint(ack_request(second, checkpoint_id))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"belongs to job {first}" in (raised.value.details() or "")


async def test_acknowledge_checkpoint_task_not_included(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.tm.AcknowledgeCheckpoint(
            ack_request(job_id, checkpoint_id, vertex_id="ghost")
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "task ghost_0 is not a task of checkpoint" in (raised.value.details() or "")


# ---------------------------------------------------------------- ReportStateCompletion


def completion_request(
    checkpoint_id: int, instance: str = "src_0", location: str = "file:///state/a"
) -> fpb.ReportStateCompletionRequest:
    return fpb.ReportStateCompletionRequest(
        checkpoint_id=checkpoint_id,
        operator_instance_id=instance,
        state_location=location,
        input_offsets={"partition-0": 5},
    )


async def test_state_completion_accepted(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    reply = await cluster.jm.ReportStateCompletion(completion_request(checkpoint_id))
    assert reply.ack
    ack = cluster.state.checkpoints[checkpoint_id].acknowledgements["src_0"]
    assert ack.snapshot_handle == "file:///state/a"
    assert dict(ack.source_offsets) == {"partition-0": 5}
    assert ack.task_manager_id == "tm-1"


async def test_state_completion_completes(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    for instance in ("map_0", "sink_0", "src_0"):
        reply = await cluster.jm.ReportStateCompletion(
            completion_request(checkpoint_id, instance, f"file:///state/{instance}")
        )
        assert reply.ack
    await cluster.wait(
        lambda s: s.checkpoints[checkpoint_id].status == pb.CHECKPOINT_COMPLETED
    )


async def test_state_completion_duplicate_ignored(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    await cluster.jm.ReportStateCompletion(completion_request(checkpoint_id))
    applied = cluster.state.applied_seq
    reply = await cluster.jm.ReportStateCompletion(
        completion_request(checkpoint_id, location="file:///state/b")
    )
    assert reply.ack
    assert cluster.state.applied_seq == applied
    ack = cluster.state.checkpoints[checkpoint_id].acknowledgements["src_0"]
    assert ack.snapshot_handle == "file:///state/a"


@pytest.mark.coordinator(checkpoints={"tolerable_failed": 1})
async def test_state_completion_late_after_decline(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    await cluster.jm.ReportFailedCheckpoint(decline_request(job_id, checkpoint_id))
    reply = await cluster.jm.ReportStateCompletion(
        completion_request(checkpoint_id, location="file:///state/late")
    )
    assert not reply.ack
    (discard,) = await worker.wait_for("DiscardSnapshots")
    assert list(discard.snapshot_handles) == ["file:///state/late"]


@pytest.mark.coordinator(checkpoints={"timeout_s": 0.3, "tolerable_failed": 1})
async def test_state_completion_late_after_expiry(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    await cluster.wait(
        lambda s: s.checkpoints[checkpoint_id].failure == pb.CHECKPOINT_EXPIRED
    )
    reply = await cluster.jm.ReportStateCompletion(
        completion_request(checkpoint_id, location="file:///state/expired")
    )
    assert not reply.ack
    (discard,) = await worker.wait_for("DiscardSnapshots")
    assert list(discard.snapshot_handles) == ["file:///state/expired"]


@pytest.mark.coordinator(checkpoints={"tolerable_failed": 1})
async def test_state_completion_releases_on_failure(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    await cluster.jm.ReportStateCompletion(completion_request(checkpoint_id))
    await cluster.jm.ReportFailedCheckpoint(decline_request(job_id, checkpoint_id))
    (discard,) = await worker.wait_for("DiscardSnapshots")
    assert list(discard.snapshot_handles) == ["file:///state/a"]


async def test_state_completion_unknown_id(cluster: Cluster) -> None:
    await running_job(cluster)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.ReportStateCompletion(completion_request(999))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_state_completion_task_not_included(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.ReportStateCompletion(
            completion_request(checkpoint_id, instance="src_3")
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_state_completion_bad_instance_id(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.ReportStateCompletion(
            completion_request(checkpoint_id, instance="src")
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------- ReportFailedCheckpoint


@pytest.mark.coordinator(checkpoints={"tolerable_failed": 1})
async def test_report_failed_checkpoint_declines(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    reply = await cluster.jm.ReportFailedCheckpoint(
        decline_request(job_id, checkpoint_id)
    )
    assert reply.acknowledged
    checkpoint = cluster.state.checkpoints[checkpoint_id]
    assert checkpoint.status == pb.CHECKPOINT_FAILED
    assert checkpoint.failure == pb.CHECKPOINT_DECLINED
    assert "task map_0 declined: state backend full" in checkpoint.failure_message
    assert cluster.state.jobs[job_id].failed_checkpoints_in_row == 1
    (aborted,) = await worker.wait_for("NotifyCheckpointAborted")
    assert aborted.checkpoint_id == checkpoint_id


async def test_report_failed_checkpoint_unknown_id(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.ReportFailedCheckpoint(decline_request(job_id, 999))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_report_failed_checkpoint_empty_vertex(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.ReportFailedCheckpoint(
            decline_request(job_id, checkpoint_id, vertex_id="")
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cluster.state.checkpoints[checkpoint_id].status == pb.CHECKPOINT_PENDING


# ------------------------------------------------------------- ReportTaskStartupFailure


@pytest.mark.coordinator(restart=FAST_RESTART)
async def test_startup_failure_restarts_job(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    reply = await cluster.jm.ReportTaskStartupFailure(
        fpb.ReportTaskStartupFailureRequest(
            job_id=job_id,
            job_vertex_id="map",
            subtask_index=0,
            task_manager_id="tm-1",
            failure_reason="class op.map not found",
            attempt=1,
        )
    )
    assert reply.acknowledged
    await wait_attempt(cluster, job_id, 2)
    job = cluster.state.jobs[job_id]
    assert job.restarts == 1
    assert job.failover_attempts == 1
    assert "task map_0 failed" in job.failure_reason
    assert "class op.map not found" in job.failure_reason
    redeployed = [d for d in worker.of("DeployTask") if d.attempt == 2]
    assert sorted(d.job_vertex_id for d in redeployed) == ["map", "sink", "src"]
    assert all(not d.is_recovery for d in redeployed)
    cancelled = await worker.wait_for("CancelTask", 2)
    assert sorted(c.job_vertex_id for c in cancelled) == ["sink", "src"]
    assert all(c.attempt == 1 for c in cancelled)


async def test_startup_failure_old_attempt(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    reply = await cluster.jm.ReportTaskStartupFailure(
        fpb.ReportTaskStartupFailureRequest(
            job_id=job_id, job_vertex_id="map", subtask_index=0, attempt=7
        )
    )
    assert not reply.acknowledged
    assert cluster.state.jobs[job_id].status == pb.JOB_RUNNING


async def test_startup_failure_unknown_job(cluster: Cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.ReportTaskStartupFailure(
            fpb.ReportTaskStartupFailureRequest(
                job_id="no-such-job", job_vertex_id="map", subtask_index=0
            )
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------------ RequestCheckpoint


async def test_request_checkpoint_one_job(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    reply = await cluster.jm.RequestCheckpoint(
        fpb.RequestCheckpointRequest(job_id=job_id)
    )
    assert reply.accepted
    (checkpoint_id,) = reply.checkpoint_ids
    checkpoint = cluster.state.checkpoints[checkpoint_id]
    assert checkpoint.status == pb.CHECKPOINT_PENDING
    assert checkpoint.manual
    assert sorted(checkpoint.tasks_to_acknowledge) == ["map_0", "sink_0", "src_0"]
    (trigger,) = await worker.wait_for("TriggerTaskCheckpoint")
    assert trigger.checkpoint_id == checkpoint_id
    assert trigger.job_id == job_id
    assert trigger.job_manager_id == cluster.state.leader_id


async def test_request_checkpoint_all_jobs(cluster: Cluster) -> None:
    worker = await cluster.add_worker("tm-1")
    first = await cluster.submit()
    second = await cluster.submit()
    await cluster.wait_running(first)
    await cluster.wait_running(second)
    reply = await cluster.jm.RequestCheckpoint(fpb.RequestCheckpointRequest())
    assert reply.accepted
    assert len(reply.checkpoint_ids) == 2
    by_job = {
        cluster.state.checkpoints[cid].job_id: cid for cid in reply.checkpoint_ids
    }
    assert sorted(by_job) == sorted([first, second])
    triggers = await worker.wait_for("TriggerTaskCheckpoint", 2)
    assert sorted(t.checkpoint_id for t in triggers) == sorted(reply.checkpoint_ids)


async def test_request_checkpoint_all_none_running(cluster: Cluster) -> None:
    await cluster.submit()
    reply = await cluster.jm.RequestCheckpoint(fpb.RequestCheckpointRequest())
    assert not reply.accepted
    assert list(reply.checkpoint_ids) == []


async def test_request_checkpoint_not_running(cluster: Cluster) -> None:
    job_id = await cluster.submit()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.RequestCheckpoint(fpb.RequestCheckpointRequest(job_id=job_id))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "JOB_CREATED, not running" in (raised.value.details() or "")
    assert cluster.state.last_checkpoint_id == 0


async def test_request_checkpoint_max_concurrent(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    await request_checkpoint(cluster, job_id)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.RequestCheckpoint(fpb.RequestCheckpointRequest(job_id=job_id))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "maximum of concurrent checkpoints is 1" in (raised.value.details() or "")


async def test_request_checkpoint_unknown_job(cluster: Cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.RequestCheckpoint(
            fpb.RequestCheckpointRequest(job_id="no-such-job")
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------------ RequestRecovery


def recovery(job_id: str, checkpoint_id: int = 0) -> fpb.RequestRecoveryRequest:
    return fpb.RequestRecoveryRequest(job_id=job_id, checkpoint_id=checkpoint_id)


async def assert_restored(
    cluster: Cluster, worker: FakeWorker, job_id: str, checkpoint_id: int
) -> None:
    """Check that every task of attempt 2 restores ``checkpoint_id``."""
    await wait_attempt(cluster, job_id, 2)
    redeployed = [d for d in worker.of("DeployTask") if d.attempt == 2]
    assert len(redeployed) == 3
    for descriptor in redeployed:
        tid = f"{descriptor.job_vertex_id}_{descriptor.subtask_index}"
        assert descriptor.is_recovery, tid
        assert descriptor.recovery_checkpoint_id == checkpoint_id, tid
        assert descriptor.recovery_snapshot_handle == handle_of(checkpoint_id, tid)
        assert dict(descriptor.recovery_source_offsets) == {"offset": checkpoint_id}
    cancelled = await worker.wait_for("CancelTask", 3)
    assert sorted(c.job_vertex_id for c in cancelled) == ["map", "sink", "src"]
    assert all(c.attempt == 1 for c in cancelled)
    assert all(c.job_id == job_id for c in cancelled)


@pytest.mark.coordinator(checkpoints={"retained": 2})
async def test_request_recovery_latest(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    await complete_checkpoint(cluster, job_id)
    latest = await complete_checkpoint(cluster, job_id)
    reply = await cluster.jm.RequestRecovery(recovery(job_id))
    assert reply.recovery_initiated
    assert reply.checkpoint_id == latest
    await assert_restored(cluster, worker, job_id, latest)
    job = cluster.state.jobs[job_id]
    assert job.restarts == 1
    assert job.restore_checkpoint_id == latest
    assert job.failover_attempts == 0


@pytest.mark.coordinator(checkpoints={"retained": 2})
async def test_request_recovery_given_id(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    first = await complete_checkpoint(cluster, job_id)
    await complete_checkpoint(cluster, job_id)
    reply = await cluster.jm.RequestRecovery(recovery(job_id, first))
    assert reply.recovery_initiated
    assert reply.checkpoint_id == first
    await assert_restored(cluster, worker, job_id, first)


async def test_request_recovery_aborts_pending(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    completed = await complete_checkpoint(cluster, job_id)
    pending = await request_checkpoint(cluster, job_id)
    await cluster.jm.RequestRecovery(recovery(job_id, completed))
    checkpoint = cluster.state.checkpoints[pending]
    assert checkpoint.status == pb.CHECKPOINT_FAILED
    assert checkpoint.failure == pb.CHECKPOINT_ABORTED
    assert cluster.state.jobs[job_id].failed_checkpoints_in_row == 0
    await assert_restored(cluster, worker, job_id, completed)


async def test_request_recovery_unknown_job(cluster: Cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.RequestRecovery(recovery("no-such-job"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_request_recovery_unknown_checkpoint(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    await complete_checkpoint(cluster, job_id)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.RequestRecovery(recovery(job_id, 999))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "checkpoint 999" in (raised.value.details() or "")


async def test_request_recovery_other_jobs_checkpoint(cluster: Cluster) -> None:
    await cluster.add_worker("tm-1")
    first = await cluster.submit()
    second = await cluster.submit()
    await cluster.wait_running(first)
    await cluster.wait_running(second)
    checkpoint_id = await complete_checkpoint(cluster, first)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.RequestRecovery(recovery(second, checkpoint_id))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_request_recovery_pending_checkpoint(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.RequestRecovery(recovery(job_id, checkpoint_id))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "CHECKPOINT_PENDING, not completed" in (raised.value.details() or "")


@pytest.mark.coordinator(checkpoints={"tolerable_failed": 1})
async def test_request_recovery_failed_checkpoint(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    checkpoint_id = await request_checkpoint(cluster, job_id)
    await cluster.jm.ReportFailedCheckpoint(decline_request(job_id, checkpoint_id))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.RequestRecovery(recovery(job_id, checkpoint_id))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "CHECKPOINT_FAILED, not completed" in (raised.value.details() or "")


async def test_request_recovery_no_completed(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.RequestRecovery(recovery(job_id))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no completed checkpoint" in (raised.value.details() or "")


async def test_request_recovery_finished_job(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    checkpoint_id = await complete_checkpoint(cluster, job_id)
    for task in list(cluster.state.jobs[job_id].tasks.values()):
        await cluster.reporting.UpdateTaskStatus(
            status_request(job_id, task, pb.TASK_FINISHED)
        )
    await cluster.wait(lambda s: s.jobs[job_id].status == pb.JOB_FINISHED)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.RequestRecovery(recovery(job_id, checkpoint_id))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "JOB_FINISHED" in (raised.value.details() or "")


async def test_request_recovery_cancelled_job(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    checkpoint_id = await complete_checkpoint(cluster, job_id)
    await cluster.admin.CancelJob(svc.CancelJobRequest(job_id=job_id))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.jm.RequestRecovery(recovery(job_id, checkpoint_id))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "JOB_CANCELED" in (raised.value.details() or "")


# ------------------------------------------------------------------ admin


async def test_list_jobs_summaries(cluster: Cluster) -> None:
    await cluster.add_worker("tm-1", slots=2)
    first = await cluster.submit(pipeline(2, name="first"))
    second = await cluster.submit(pipeline(1, name="second"))
    await cluster.wait_running(first)
    reply = await cluster.admin.ListJobs(svc.ListJobsRequest())
    assert [j.job_id for j in reply.jobs] == [first, second]
    running, waiting = reply.jobs
    assert running.job_name == "first"
    assert running.status == pb.JOB_RUNNING
    assert running.tasks == 6
    assert running.tasks_running == 6
    assert waiting.job_name == "second"
    assert waiting.status == pb.JOB_CREATED
    assert waiting.tasks_running == 0


async def test_admin_lists_only_durable_registrations(cluster: Cluster) -> None:
    # A reply may show only what a crash cannot undo, so a registration
    # whose commit has not landed must not be listed yet.
    blocker = sqlite3.connect(cluster.coordinator.config.db_path, timeout=30)
    try:
        # Held well under the lease, so the leader keeps its lease.
        blocker.execute("BEGIN IMMEDIATE")
        register = asyncio.ensure_future(
            cluster.tm.RegisterTaskManager(
                fpb.RegisterTaskManagerRequest(
                    task_manager_id="tm-1",
                    address="127.0.0.1",
                    port=1,
                    slots=1,
                    incarnation=1,
                )
            )
        )
        await asyncio.sleep(0.2)
        assert not register.done()
        listing = asyncio.ensure_future(
            cluster.admin.ListTaskManagers(svc.ListTaskManagersRequest())
        )
        await asyncio.sleep(0.2)
        if listing.done():
            listed = [
                s.task_manager.task_manager_id for s in listing.result().task_managers
            ]
            assert "tm-1" not in listed, "listed before its registration was durable"
    finally:
        blocker.rollback()
        blocker.close()
    assert (await register).success
    await listing


async def test_admin_replies_after_caller_gave_up(cluster: Cluster) -> None:
    # A registration whose caller gave up before its commit landed is still
    # durable once it lands, so the admin queries, which wait until what they
    # show is durable, reply.
    blocker = sqlite3.connect(cluster.coordinator.config.db_path, timeout=30)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await cluster.tm.RegisterTaskManager(
                fpb.RegisterTaskManagerRequest(
                    task_manager_id="tm-1",
                    address="127.0.0.1",
                    port=1,
                    slots=1,
                    incarnation=1,
                ),
                timeout=0.2,
            )
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        blocker.rollback()
        blocker.close()
    reply = await cluster.admin.ListTaskManagers(
        svc.ListTaskManagersRequest(), timeout=20
    )
    assert [s.task_manager.task_manager_id for s in reply.task_managers] == ["tm-1"]


async def test_get_job_returns_state(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    job = await cluster.admin.GetJob(svc.GetJobRequest(job_id=job_id))
    assert job.job_id == job_id
    assert job.status == pb.JOB_RUNNING
    assert job.graph.job_name == "pipeline"
    assert job.tasks["src_0"].task_manager_id == "tm-1"
    assert job == cluster.state.jobs[job_id]


async def test_get_job_unknown(cluster: Cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.admin.GetJob(svc.GetJobRequest(job_id="no-such-job"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_get_job_empty_id(cluster: Cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.admin.GetJob(svc.GetJobRequest())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancel_job_running(cluster: Cluster) -> None:
    worker, job_id = await running_job(cluster)
    pending = await request_checkpoint(cluster, job_id)
    reply = await cluster.admin.CancelJob(svc.CancelJobRequest(job_id=job_id))
    assert reply.status == pb.JOB_CANCELED
    job = cluster.state.jobs[job_id]
    assert job.status == pb.JOB_CANCELED
    assert all(t.status == pb.TASK_CANCELED for t in job.tasks.values())
    assert cluster.state.checkpoints[pending].failure == pb.CHECKPOINT_ABORTED
    cancelled = await worker.wait_for("CancelTask", 3)
    assert sorted(c.job_vertex_id for c in cancelled) == ["map", "sink", "src"]


async def test_cancel_job_twice(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    await cluster.admin.CancelJob(svc.CancelJobRequest(job_id=job_id))
    applied = cluster.state.applied_seq
    reply = await cluster.admin.CancelJob(svc.CancelJobRequest(job_id=job_id))
    assert reply.status == pb.JOB_CANCELED
    assert cluster.state.applied_seq == applied


async def test_cancel_job_finished(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    for task in list(cluster.state.jobs[job_id].tasks.values()):
        await cluster.reporting.UpdateTaskStatus(
            status_request(job_id, task, pb.TASK_FINISHED)
        )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.admin.CancelJob(svc.CancelJobRequest(job_id=job_id))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert cluster.state.jobs[job_id].status == pb.JOB_FINISHED


async def test_cancel_job_unknown(cluster: Cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.admin.CancelJob(svc.CancelJobRequest(job_id="no-such-job"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_job_empty_id(cluster: Cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.admin.CancelJob(svc.CancelJobRequest())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_task_managers_slots_free(cluster: Cluster) -> None:
    await cluster.add_worker("tm-1", slots=4)
    job_id = await cluster.submit(pipeline(3))
    await cluster.wait_running(job_id)
    await cluster.add_worker("tm-2", slots=2)
    reply = await cluster.admin.ListTaskManagers(svc.ListTaskManagersRequest())
    summaries = {s.task_manager.task_manager_id: s for s in reply.task_managers}
    assert sorted(summaries) == ["tm-1", "tm-2"]
    assert summaries["tm-1"].slots_free == 1
    assert summaries["tm-2"].slots_free == 2
    assert summaries["tm-1"].task_manager.slots == 4
    assert summaries["tm-1"].task_manager.status == pb.TASK_MANAGER_ALIVE
    await cluster.admin.CancelJob(svc.CancelJobRequest(job_id=job_id))
    reply = await cluster.admin.ListTaskManagers(svc.ListTaskManagersRequest())
    summaries = {s.task_manager.task_manager_id: s for s in reply.task_managers}
    assert summaries["tm-1"].slots_free == 4


@pytest.mark.coordinator(checkpoints={"tolerable_failed": 1})
async def test_list_checkpoints_statuses(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    completed = await complete_checkpoint(cluster, job_id)
    declined = await request_checkpoint(cluster, job_id)
    await cluster.jm.ReportFailedCheckpoint(decline_request(job_id, declined))
    pending = await request_checkpoint(cluster, job_id)
    reply = await cluster.admin.ListCheckpoints(
        svc.ListCheckpointsRequest(job_id=job_id)
    )
    assert [c.checkpoint_id for c in reply.checkpoints] == [
        completed,
        declined,
        pending,
    ]
    done, failed, waiting = reply.checkpoints
    assert done.status == pb.CHECKPOINT_COMPLETED
    assert done.acknowledged_tasks == 3
    assert done.total_tasks == 3
    assert done.size == 30
    assert done.finished_ms >= done.triggered_ms
    assert failed.status == pb.CHECKPOINT_FAILED
    assert failed.failure == pb.CHECKPOINT_DECLINED
    assert "task map_0 declined" in failed.failure_message
    assert waiting.status == pb.CHECKPOINT_PENDING
    assert waiting.acknowledged_tasks == 0
    assert waiting.finished_ms == 0


async def test_list_checkpoints_unknown_job(cluster: Cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.admin.ListCheckpoints(
            svc.ListCheckpointsRequest(job_id="no-such-job")
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_get_overview_counts(cluster: Cluster) -> None:
    _, running = await running_job(cluster, slots=4)
    waiting = await cluster.submit(pipeline(5))
    cancelled = await cluster.submit(pipeline(5))
    await cluster.admin.CancelJob(svc.CancelJobRequest(job_id=cancelled))
    overview = await cluster.admin.GetOverview(svc.GetOverviewRequest())
    engine = cluster.coordinator.engine
    assert engine is not None
    assert overview.coordinator_id == engine.coordinator_id
    assert overview.leader_id == engine.coordinator_id
    assert overview.leader_address == cluster.coordinator.address
    assert overview.epoch == engine.epoch
    assert overview.applied_seq == cluster.state.applied_seq
    assert overview.task_managers == 1
    assert overview.slots_total == 4
    assert overview.slots_free == 3
    assert overview.jobs_running == 1
    assert overview.jobs_pending == 1
    assert overview.jobs_canceled == 1
    assert overview.jobs_finished == 0
    assert overview.jobs_failed == 0
    assert cluster.state.jobs[running].status == pb.JOB_RUNNING
    assert cluster.state.jobs[waiting].status == pb.JOB_CREATED


async def test_watch_events_from_seq(cluster: Cluster) -> None:
    await cluster.add_worker("tm-1")
    from_seq = cluster.state.applied_seq
    call = cluster.admin.WatchEvents(svc.WatchEventsRequest(from_seq=from_seq))
    try:
        first = await call.read()
        assert isinstance(first, pb.Event)
        assert first.seq == from_seq
        assert first.WhichOneof("body") == "task_manager_registered"
        job_id = await cluster.submit()
        seen: list[pb.Event] = [first]
        async with asyncio.timeout(10):
            while seen[-1].WhichOneof("body") != "job_submitted":
                ev = await call.read()
                assert isinstance(ev, pb.Event)
                seen.append(ev)
        assert seen[-1].job_submitted.job_id == job_id
        assert [e.seq for e in seen] == list(range(from_seq, from_seq + len(seen)))
        assert all(e.epoch == cluster.state.epoch for e in seen)
    finally:
        call.cancel()


async def test_watch_events_from_start(cluster: Cluster) -> None:
    call = cluster.admin.WatchEvents(svc.WatchEventsRequest(from_seq=0))
    try:
        first = await call.read()
        assert isinstance(first, pb.Event)
        assert first.seq == 1
        assert first.WhichOneof("body") == "leader_elected"
    finally:
        call.cancel()


async def test_watch_events_negative_seq(cluster: Cluster) -> None:
    call = cluster.admin.WatchEvents(svc.WatchEventsRequest(from_seq=-1))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------ UpdateTaskStatus


async def test_update_task_status_finishes_job(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    tasks = sorted(cluster.state.jobs[job_id].tasks.items())
    for tid, task in tasks:
        reply = await cluster.reporting.UpdateTaskStatus(
            status_request(job_id, task, pb.TASK_FINISHED)
        )
        assert reply.acknowledged, tid
        assert cluster.state.jobs[job_id].tasks[tid].status == pb.TASK_FINISHED
    job = cluster.state.jobs[job_id]
    assert job.status == pb.JOB_FINISHED


async def test_update_task_status_partial_finish(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    task = cluster.state.jobs[job_id].tasks["src_0"]
    await cluster.reporting.UpdateTaskStatus(
        status_request(job_id, task, pb.TASK_FINISHED)
    )
    assert cluster.state.jobs[job_id].status == pb.JOB_RUNNING


@pytest.mark.coordinator(restart=FAST_RESTART)
async def test_update_task_status_old_attempt(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    task = pb.TaskState()
    task.CopyFrom(cluster.state.jobs[job_id].tasks["map_0"])
    await cluster.reporting.UpdateTaskStatus(
        status_request(job_id, task, pb.TASK_FAILED)
    )
    await wait_attempt(cluster, job_id, 2)
    applied = cluster.state.applied_seq
    reply = await cluster.reporting.UpdateTaskStatus(
        status_request(job_id, task, pb.TASK_FINISHED, attempt=1)
    )
    assert not reply.acknowledged
    assert cluster.state.applied_seq == applied
    assert cluster.state.jobs[job_id].tasks["map_0"].status == pb.TASK_RUNNING


async def test_update_task_status_invalid_status(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    task = cluster.state.jobs[job_id].tasks["map_0"]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.reporting.UpdateTaskStatus(
            status_request(job_id, task, pb.TASK_CANCELED)
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_update_task_status_out_of_range_status(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    task = cluster.state.jobs[job_id].tasks["map_0"]
    request = status_request(job_id, task, pb.TASK_RUNNING)
    request.status = 99  # type: ignore[assignment]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.reporting.UpdateTaskStatus(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "99" in (raised.value.details() or "")


async def test_update_task_status_unknown_task(cluster: Cluster) -> None:
    _, job_id = await running_job(cluster)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await cluster.reporting.UpdateTaskStatus(
            svc.UpdateTaskStatusRequest(
                job_id=job_id,
                job_vertex_id="ghost",
                subtask_index=0,
                status=pb.TASK_RUNNING,
            )
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
