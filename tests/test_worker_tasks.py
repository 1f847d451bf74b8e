"""Deploying, cancelling, checkpointing and restoring tasks on one worker,
against a stand-in coordinator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc
from tests.worker_helpers.fake_coordinator import FakeCoordinator
from tests.worker_helpers.jobs import write_events
from worker.server import Worker, WorkerConfig

EPOCH = (("jobledger-leader-epoch", "1"),)
FUNCTIONS = "tests.worker_helpers.functions"


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.execution = fpb_grpc.TaskExecutionStub(channel)
        self.checkpointing = fpb_grpc.TaskManagerCheckpointingStub(channel)
        self.control = svc_grpc.TaskManagerControlStub(channel)


@pytest.fixture
async def setup(
    tmp_path: Path,
) -> AsyncIterator[tuple[FakeCoordinator, Worker, Stubs]]:
    coordinator = FakeCoordinator()
    await coordinator.start()
    worker = Worker(
        WorkerConfig(
            coordinators=[f"127.0.0.1:{coordinator.port}"],
            state_dir=str(tmp_path / "state"),
            task_manager_id="tm",
            heartbeat_interval_s=0.05,
        )
    )
    await worker.start()
    await worker.wait_registered()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}")
    yield coordinator, worker, Stubs(channel)
    await channel.close()
    await worker.stop()
    await coordinator.stop()


def chained_descriptor(
    tmp_path: Path, attempt: int = 1, delay_ms: float = 0.0, **extra: Any
) -> fpb.TaskDeploymentDescriptor:
    """Return a source -> map -> file sink chain in one task."""
    source = {
        "path": str(tmp_path / "events.csv"),
        "types": {"amount": "int", "ts": "int"},
        "delay_ms": delay_ms,
    }
    return fpb.TaskDeploymentDescriptor(
        job_graph_job_id="job-1",
        job_vertex_id="src",
        subtask_index=0,
        attempt=attempt,
        parallelism=1,
        fully_qualified_operator_name="jobledger.source.csv",
        operator_configuration=json.dumps(source).encode(),
        chained_operator_info=[
            fpb.ChainedOperatorInfo(
                fully_qualified_operator_name="jobledger.map",
                operator_configuration=json.dumps(
                    {"function": f"{FUNCTIONS}:double_amount"}
                ).encode(),
            ),
            fpb.ChainedOperatorInfo(
                fully_qualified_operator_name="jobledger.sink.file",
                operator_configuration=json.dumps(
                    {"path": str(tmp_path / "out.jsonl")}
                ).encode(),
            ),
        ],
        **extra,
    )


def statuses(coordinator: FakeCoordinator, attempt: int) -> list[int]:
    return [
        r.status for r in coordinator.of("UpdateTaskStatus") if r.attempt == attempt
    ]


def read_snapshot(handle: str) -> tuple[int, Any]:
    """Return a snapshot file's size and content, or (0, {}) when it is gone."""
    path = Path(handle)
    if not path.exists():
        return 0, {}
    return path.stat().st_size, json.loads(path.read_text())


def output(tmp_path: Path) -> list[Any]:
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


async def test_chained_task_runs_once(
    setup: tuple[FakeCoordinator, Worker, Stubs], tmp_path: Path
) -> None:
    coordinator, _, stubs = setup
    events = write_events(tmp_path / "events.csv", 30)
    descriptor = chained_descriptor(tmp_path)
    for _ in range(2):
        reply = await stubs.execution.DeployTask(descriptor, metadata=EPOCH)
        assert reply.success, reply.message
    await coordinator.wait_for(lambda f: pb.TASK_FINISHED in statuses(f, 1))
    reply = await stubs.execution.DeployTask(descriptor, metadata=EPOCH)
    assert reply.success
    assert [row["amount"] for row in output(tmp_path)] == [
        e["amount"] * 2 for e in events
    ]
    assert statuses(coordinator, 1) == [pb.TASK_RUNNING, pb.TASK_FINISHED]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"fully_qualified_operator_name": "no.such.op"}, "unknown operator"),
        ({"operator_configuration": b"{not json"}, "not valid JSON"),
        ({"operator_configuration": b'{"path": 3}'}, "must be of type str"),
        (
            {
                "fully_qualified_operator_name": "jobledger.map",
                "operator_configuration": json.dumps(
                    {"function": f"{FUNCTIONS}:double_amount"}
                ).encode(),
            },
            "not a source, and has no inputs",
        ),
        (
            {
                "outputs": [
                    fpb.OperatorOutput(
                        target_vertex_id="sink", target_task_endpoint="no-port"
                    )
                ]
            },
            "target_task_endpoint 'no-port', which is not HOST:PORT",
        ),
        (
            {"operator_configuration": b'{"path": "/no/such/events.csv"}'},
            "/no/such/events.csv does not exist",
        ),
        (
            {"operator_configuration": b'{"path": "x", "types": {"a": ["int"]}}'},
            "type ['int'] of field 'a' is unknown",
        ),
        (
            {
                "fully_qualified_operator_name": "jobledger.map",
                "operator_configuration": b"{}",
            },
            "configuration field 'function' is missing",
        ),
        (
            {
                "fully_qualified_operator_name": "jobledger.map",
                "operator_configuration": json.dumps(
                    {"function": f"{FUNCTIONS}:no_such_function"}
                ).encode(),
            },
            "has no function no_such_function",
        ),
        (
            {
                "fully_qualified_operator_name": "jobledger.map",
                "operator_configuration": json.dumps(
                    {"function": "tests.worker_helpers.broken_import:f"}
                ).encode(),
            },
            "importing tests.worker_helpers.broken_import failed",
        ),
    ],
)
async def test_bad_descriptor_rejected(
    setup: tuple[FakeCoordinator, Worker, Stubs],
    tmp_path: Path,
    change: dict[str, Any],
    reason: str,
) -> None:
    coordinator, _, stubs = setup
    write_events(tmp_path / "events.csv", 3)
    descriptor = chained_descriptor(tmp_path, attempt=3)
    for field, value in change.items():
        if isinstance(value, list):
            getattr(descriptor, field).extend(value)
        else:
            setattr(descriptor, field, value)
    reply = await stubs.execution.DeployTask(descriptor, metadata=EPOCH)
    assert not reply.success
    assert reason in reply.message
    (failure,) = await coordinator.wait_report("ReportTaskStartupFailure")
    assert failure.attempt == 3
    assert failure.job_vertex_id == "src"
    assert failure.task_manager_id == "tm"
    assert reason in failure.failure_reason
    # Only the endpoint comes from the placement, which a restart may change.
    # Every other case comes from the task's configuration.
    assert failure.unrecoverable == ("HOST:PORT" not in reason)


async def test_cancel_only_that_attempt(
    setup: tuple[FakeCoordinator, Worker, Stubs], tmp_path: Path
) -> None:
    coordinator, worker, stubs = setup
    write_events(tmp_path / "events.csv", 1000)
    descriptor = chained_descriptor(tmp_path, delay_ms=5)
    await stubs.execution.DeployTask(descriptor, metadata=EPOCH)
    await coordinator.wait_for(lambda f: pb.TASK_RUNNING in statuses(f, 1))
    request = svc.CancelTaskRequest(
        job_id="job-1", job_vertex_id="src", subtask_index=0, attempt=2
    )
    assert not (await stubs.control.CancelTask(request, metadata=EPOCH)).canceled
    assert worker.runtime is not None
    assert len(worker.runtime.tasks) == 1
    request.attempt = 1
    assert (await stubs.control.CancelTask(request, metadata=EPOCH)).canceled
    assert worker.runtime.tasks == {}
    assert statuses(coordinator, 1) == [pb.TASK_RUNNING]


async def test_canceled_attempt_not_rerun(
    setup: tuple[FakeCoordinator, Worker, Stubs], tmp_path: Path
) -> None:
    coordinator, worker, stubs = setup
    write_events(tmp_path / "events.csv", 1000)
    descriptor = chained_descriptor(tmp_path, delay_ms=5)
    assert (await stubs.execution.DeployTask(descriptor, metadata=EPOCH)).success
    await coordinator.wait_for(lambda f: pb.TASK_RUNNING in statuses(f, 1))
    cancel = svc.CancelTaskRequest(
        job_id="job-1", job_vertex_id="src", subtask_index=0, attempt=1
    )
    assert (await stubs.control.CancelTask(cancel, metadata=EPOCH)).canceled
    # A DeployTask retried after the cancellation must not start it again.
    reply = await stubs.execution.DeployTask(descriptor, metadata=EPOCH)
    assert not reply.success
    assert "attempt 1 of task src_0 was canceled here already" in reply.message
    assert worker.runtime is not None
    assert worker.runtime.tasks == {}
    assert statuses(coordinator, 1) == [pb.TASK_RUNNING]


async def test_newer_attempt_replaces_older(
    setup: tuple[FakeCoordinator, Worker, Stubs], tmp_path: Path
) -> None:
    _, worker, stubs = setup
    write_events(tmp_path / "events.csv", 1000)
    await stubs.execution.DeployTask(
        chained_descriptor(tmp_path, delay_ms=5), metadata=EPOCH
    )
    await stubs.execution.DeployTask(
        chained_descriptor(tmp_path, attempt=2, delay_ms=5), metadata=EPOCH
    )
    assert worker.runtime is not None
    assert [key.attempt for key in worker.runtime.tasks] == [2]


async def test_checkpoint_acknowledged_and_discarded(
    setup: tuple[FakeCoordinator, Worker, Stubs], tmp_path: Path
) -> None:
    coordinator, _, stubs = setup
    write_events(tmp_path / "events.csv", 1000)
    await stubs.execution.DeployTask(
        chained_descriptor(tmp_path, delay_ms=2), metadata=EPOCH
    )
    await coordinator.wait_for(lambda f: pb.TASK_RUNNING in statuses(f, 1))
    trigger = fpb.TriggerCheckpointRequest(job_id="job-1", checkpoint_id=7)
    reply = await stubs.checkpointing.TriggerTaskCheckpoint(trigger, metadata=EPOCH)
    assert reply.acknowledged
    (ack,) = await coordinator.wait_report("AcknowledgeCheckpoint")
    assert ack.checkpoint_id == 7
    assert (ack.job_id, ack.job_vertex_id, ack.subtask_index) == ("job-1", "src", 0)
    assert ack.task_manager_id == "tm"
    assert ack.source_offsets["row"] > 0
    size, snapshot = read_snapshot(ack.snapshot_handle)
    assert ack.snapshot_size == size
    assert snapshot["source_offsets"] == dict(ack.source_offsets)
    outside = tmp_path / "not-a-snapshot.json"
    outside.write_text("{}")
    discard = svc.DiscardSnapshotsRequest(
        snapshot_handles=[ack.snapshot_handle, str(outside)]
    )
    reply2 = await stubs.control.DiscardSnapshots(discard, metadata=EPOCH)
    assert reply2.discarded == 1
    assert read_snapshot(ack.snapshot_handle) == (0, {})
    assert outside.exists()


async def test_trigger_without_source_not_acknowledged(
    setup: tuple[FakeCoordinator, Worker, Stubs],
) -> None:
    _, _, stubs = setup
    trigger = fpb.TriggerCheckpointRequest(job_id="job-9", checkpoint_id=1)
    reply = await stubs.checkpointing.TriggerTaskCheckpoint(trigger, metadata=EPOCH)
    assert not reply.acknowledged


async def test_restore_resumes_exactly_once(
    setup: tuple[FakeCoordinator, Worker, Stubs], tmp_path: Path
) -> None:
    coordinator, _, stubs = setup
    events = write_events(tmp_path / "events.csv", 300)
    await stubs.execution.DeployTask(
        chained_descriptor(tmp_path, delay_ms=2), metadata=EPOCH
    )
    await coordinator.wait_for(lambda f: pb.TASK_RUNNING in statuses(f, 1))
    trigger = fpb.TriggerCheckpointRequest(job_id="job-1", checkpoint_id=1)
    await stubs.checkpointing.TriggerTaskCheckpoint(trigger, metadata=EPOCH)
    (ack,) = await coordinator.wait_report("AcknowledgeCheckpoint")
    # The attempt dies before it hears that checkpoint 1 completed.
    cancel = svc.CancelTaskRequest(
        job_id="job-1", job_vertex_id="src", subtask_index=0, attempt=1
    )
    await stubs.control.CancelTask(cancel, metadata=EPOCH)
    recovery = chained_descriptor(
        tmp_path,
        attempt=2,
        is_recovery=True,
        recovery_checkpoint_id=1,
        recovery_snapshot_handle=ack.snapshot_handle,
        recovery_source_offsets=ack.source_offsets,
    )
    reply = await stubs.execution.DeployTask(recovery, metadata=EPOCH)
    assert reply.success, reply.message
    await coordinator.wait_for(lambda f: pb.TASK_FINISHED in statuses(f, 2))
    assert [row["ts"] for row in output(tmp_path)] == [e["ts"] for e in events]


async def test_missing_snapshot_rejected(
    setup: tuple[FakeCoordinator, Worker, Stubs], tmp_path: Path
) -> None:
    _, _, stubs = setup
    write_events(tmp_path / "events.csv", 3)
    recovery = chained_descriptor(
        tmp_path,
        is_recovery=True,
        recovery_checkpoint_id=4,
        recovery_snapshot_handle=str(tmp_path / "gone.json"),
    )
    reply = await stubs.execution.DeployTask(recovery, metadata=EPOCH)
    assert not reply.success
    assert "gone.json cannot be read" in reply.message


@pytest.mark.parametrize(
    "snapshot",
    [
        [1, 2],
        {"operators": "none"},
        {"operators": [None, None, None]},
        {"operators": [None, {"no": "pending"}]},
    ],
)
async def test_mismatched_snapshot_rejected(
    setup: tuple[FakeCoordinator, Worker, Stubs], tmp_path: Path, snapshot: Any
) -> None:
    coordinator, worker, stubs = setup
    write_events(tmp_path / "events.csv", 3)
    handle = tmp_path / "foreign.json"
    handle.write_text(json.dumps(snapshot))
    recovery = chained_descriptor(
        tmp_path,
        is_recovery=True,
        recovery_checkpoint_id=4,
        recovery_snapshot_handle=str(handle),
    )
    reply = await stubs.execution.DeployTask(recovery, metadata=EPOCH)
    assert not reply.success
    assert f"snapshot {handle}" in reply.message
    (failure,) = await coordinator.wait_report("ReportTaskStartupFailure")
    assert f"snapshot {handle}" in failure.failure_reason
    assert not failure.unrecoverable
    assert worker.runtime is not None
    assert worker.runtime.tasks == {}


def unserializable_descriptor(tmp_path: Path) -> fpb.TaskDeploymentDescriptor:
    """Return source -> set-valued aggregate -> filter dropping all -> sink."""
    descriptor = chained_descriptor(tmp_path, delay_ms=2)
    del descriptor.chained_operator_info[:]
    descriptor.chained_operator_info.extend(
        fpb.ChainedOperatorInfo(
            fully_qualified_operator_name=name,
            operator_configuration=json.dumps(config).encode(),
        )
        for name, config in (
            (
                "jobledger.aggregate",
                {"key": "user", "aggregate": f"{FUNCTIONS}:as_set", "field": "amount"},
            ),
            ("jobledger.filter", {"function": f"{FUNCTIONS}:reject"}),
            ("jobledger.sink.print", {}),
        )
    )
    return descriptor


async def trigger_and_wait_decline(
    coordinator: FakeCoordinator, stubs: Stubs, checkpoint_id: int
) -> fpb.ReportFailedCheckpointRequest:
    trigger = fpb.TriggerCheckpointRequest(job_id="job-1", checkpoint_id=checkpoint_id)
    await stubs.checkpointing.TriggerTaskCheckpoint(trigger, metadata=EPOCH)
    (decline,) = await coordinator.wait_report("ReportFailedCheckpoint")
    return decline  # type: ignore[no-any-return]


async def test_unwritable_snapshot_declined(
    setup: tuple[FakeCoordinator, Worker, Stubs], tmp_path: Path
) -> None:
    coordinator, _, stubs = setup
    write_events(tmp_path / "events.csv", 1000)
    await stubs.execution.DeployTask(
        unserializable_descriptor(tmp_path), metadata=EPOCH
    )
    await coordinator.wait_for(lambda f: pb.TASK_RUNNING in statuses(f, 1))
    decline = await trigger_and_wait_decline(coordinator, stubs, 5)
    assert decline.checkpoint_id == 5
    assert (decline.job_id, decline.job_vertex_id) == ("job-1", "src")
    assert decline.task_manager_id == "tm"
    assert "task src_0 for checkpoint 5 cannot be serialized" in (
        decline.failure_reason
    )
    assert coordinator.of("AcknowledgeCheckpoint") == []


def replace_with_file(directory: Path) -> None:
    directory.rmdir()
    directory.write_text("")


async def test_failed_sink_staging_declined(
    setup: tuple[FakeCoordinator, Worker, Stubs], tmp_path: Path
) -> None:
    coordinator, _, stubs = setup
    write_events(tmp_path / "events.csv", 1000)
    await stubs.execution.DeployTask(
        chained_descriptor(tmp_path, delay_ms=2), metadata=EPOCH
    )
    await coordinator.wait_for(lambda f: pb.TASK_RUNNING in statuses(f, 1))
    # The sink can no longer stage: its staging directory became a file.
    replace_with_file(tmp_path / "out.jsonl.staging")
    decline = await trigger_and_wait_decline(coordinator, stubs, 6)
    assert "operator 1 (FileSink) of task src_0" in decline.failure_reason
    assert "NotADirectoryError" in decline.failure_reason
    # The task goes on; only the checkpoint failed.
    assert pb.TASK_FAILED not in statuses(coordinator, 1)


async def test_heartbeat_reports_running_task(
    setup: tuple[FakeCoordinator, Worker, Stubs], tmp_path: Path
) -> None:
    coordinator, _, stubs = setup
    write_events(tmp_path / "events.csv", 1000)
    await stubs.execution.DeployTask(
        chained_descriptor(tmp_path, attempt=2, delay_ms=2), metadata=EPOCH
    )

    def reported(fake: FakeCoordinator) -> bool:
        last = fake.heartbeats[-1] if fake.heartbeats else None
        return last is not None and any(m.records_in > 0 for m in last.task_metrics)

    await coordinator.wait_for(reported)
    heartbeat = coordinator.heartbeats[-1]
    (metric,) = heartbeat.task_metrics
    assert (metric.job_id, metric.task_id) == ("job-1", "src_0")
    assert metric.records_out == 0
    (running,) = heartbeat.running_tasks
    assert (running.job_id, running.job_vertex_id, running.attempt) == (
        "job-1",
        "src",
        2,
    )


async def test_stale_attempt_rejected(
    setup: tuple[FakeCoordinator, Worker, Stubs], tmp_path: Path
) -> None:
    _, worker, stubs = setup
    write_events(tmp_path / "events.csv", 1000)
    newer = chained_descriptor(tmp_path, attempt=3, delay_ms=5)
    assert (await stubs.execution.DeployTask(newer, metadata=EPOCH)).success
    older = chained_descriptor(tmp_path, attempt=2, delay_ms=5)
    reply = await stubs.execution.DeployTask(older, metadata=EPOCH)
    assert not reply.success
    assert "attempt 2 is stale: attempt 3 runs here" in reply.message
    assert worker.runtime is not None
    assert [key.attempt for key in worker.runtime.tasks] == [3]


async def test_failed_staging_keeps_records(
    setup: tuple[FakeCoordinator, Worker, Stubs], tmp_path: Path
) -> None:
    coordinator, _, stubs = setup
    events = write_events(tmp_path / "events.csv", 300)
    await stubs.execution.DeployTask(
        chained_descriptor(tmp_path, delay_ms=3), metadata=EPOCH
    )
    await coordinator.wait_for(lambda f: pb.TASK_RUNNING in statuses(f, 1))
    staging = tmp_path / "out.jsonl.staging"
    replace_with_file(staging)
    await trigger_and_wait_decline(coordinator, stubs, 6)
    # Staging works again; the records of the failed checkpoint must still
    # reach the output.
    staging.unlink()
    staging.mkdir()
    await coordinator.wait_for(lambda f: pb.TASK_FINISHED in statuses(f, 1))
    assert [row["ts"] for row in output(tmp_path)] == [e["ts"] for e in events]


async def test_deposed_leader_cannot_deploy_or_trigger(
    setup: tuple[FakeCoordinator, Worker, Stubs], tmp_path: Path
) -> None:
    coordinator, worker, stubs = setup
    write_events(tmp_path / "events.csv", 1000)
    newer, older = (
        (("jobledger-leader-epoch", "3"),),
        (("jobledger-leader-epoch", "2"),),
    )
    descriptor = chained_descriptor(tmp_path, delay_ms=5)
    assert (await stubs.execution.DeployTask(descriptor, metadata=newer)).success
    await coordinator.wait_for(lambda f: pb.TASK_RUNNING in statuses(f, 1))

    # Epoch 3 was seen, so calls of epoch 2 come from a deposed leader.
    trigger = fpb.TriggerCheckpointRequest(job_id="job-1", checkpoint_id=9)
    calls = {
        "DeployTask": stubs.execution.DeployTask(
            chained_descriptor(tmp_path, attempt=2), metadata=older
        ),
        "TriggerTaskCheckpoint": stubs.checkpointing.TriggerTaskCheckpoint(
            trigger, metadata=older
        ),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name
        assert "epoch 2 is stale" in (raised.value.details() or ""), name

    assert worker.runtime is not None
    assert [key.attempt for key in worker.runtime.tasks] == [1]
    assert worker.fence.highest == 3

    # The rejected trigger injected no barrier: the next checkpoint is the
    # first one acknowledged.
    trigger = fpb.TriggerCheckpointRequest(job_id="job-1", checkpoint_id=10)
    await stubs.checkpointing.TriggerTaskCheckpoint(trigger, metadata=newer)
    acks = await coordinator.wait_report("AcknowledgeCheckpoint")
    assert [ack.checkpoint_id for ack in acks] == [10]
