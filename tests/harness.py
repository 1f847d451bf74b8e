"""Shared parts of coordinator tests: graphs, a client and the replay check."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import grpc

from coordinator.config import CheckpointConfig, CoordinatorConfig
from coordinator.replay import replay
from coordinator.server import Coordinator
from eventlog import SqliteEventLog
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc
from tests.fake_worker import FakeWorker


def vertex(
    vid: str,
    kind: int,
    parallelism: int = 1,
    inputs: tuple[str, ...] = (),
    outputs: tuple[str, ...] = (),
) -> fpb.JobVertex:
    return fpb.JobVertex(
        id=vid,
        name=vid,
        parallelism=parallelism,
        vertex_type=kind,  # type: ignore[arg-type]
        operator_definition=fpb.OperatorDefinition(fully_qualified_name=f"op.{vid}"),
        input_edge_ids=list(inputs),
        output_edge_ids=list(outputs),
    )


def pipeline(parallelism: int = 1, name: str = "pipeline") -> fpb.JobGraph:
    """Return source -> map -> sink, HASH between map and sink."""
    return fpb.JobGraph(
        job_name=name,
        vertices=[
            vertex("src", fpb.SOURCE, parallelism, outputs=("e1",)),
            vertex("map", fpb.OPERATOR, parallelism, inputs=("e1",), outputs=("e2",)),
            vertex("sink", fpb.SINK, parallelism, inputs=("e2",)),
        ],
        edges=[
            fpb.JobEdge(id="e1", source_vertex_id="src", target_vertex_id="map"),
            fpb.JobEdge(
                id="e2",
                source_vertex_id="map",
                target_vertex_id="sink",
                shuffle_mode=fpb.HASH,
            ),
        ],
    )


def config(path: Path, **overrides: Any) -> CoordinatorConfig:
    """Return a test configuration: port 0, fast ticks, a short lease."""
    checkpoint_overrides = overrides.pop("checkpoints", {})
    return CoordinatorConfig(
        db_path=str(path),
        listen="127.0.0.1:0",
        checkpoints=CheckpointConfig(**checkpoint_overrides),
        tick_s=0.02,
        lease_s=overrides.pop("lease_s", 2.0),
        worker_call_timeout_s=overrides.pop("worker_call_timeout_s", 2.0),
        **overrides,
    )


@dataclasses.dataclass
class Cluster:
    """A coordinator in this process, its client stubs and fake workers."""

    coordinator: Coordinator
    channel: grpc.aio.Channel
    jm: fpb_grpc.JobManagerInternalServiceStub
    tm: fpb_grpc.TaskManagerRegistrationStub
    admin: svc_grpc.AdminServiceStub
    reporting: svc_grpc.TaskReportingStub
    workers: dict[str, FakeWorker]

    @property
    def state(self) -> pb.CoordinatorState:
        assert self.coordinator.engine is not None
        return self.coordinator.engine.state

    async def add_worker(
        self, tm_id: str, slots: int = 4, incarnation: int = 1
    ) -> FakeWorker:
        worker = FakeWorker(tm_id)
        await worker.start()
        self.workers[tm_id] = worker
        await self.tm.RegisterTaskManager(
            fpb.RegisterTaskManagerRequest(
                task_manager_id=tm_id,
                address="127.0.0.1",
                port=worker.port,
                slots=slots,
                incarnation=incarnation,
            )
        )
        return worker

    async def submit(self, graph: fpb.JobGraph | None = None) -> str:
        reply = await self.jm.SubmitJob(
            fpb.SubmitJobRequest(job_graph=graph or pipeline())
        )
        return reply.job_id

    async def wait(self, predicate: Any, timeout: float = 10.0) -> None:
        """Wait until ``predicate(state)`` holds."""
        async with asyncio.timeout(timeout):
            while not predicate(self.state):
                await asyncio.sleep(0.01)

    async def wait_running(self, job_id: str) -> None:
        await self.wait(
            lambda s: (
                s.jobs[job_id].status == pb.JOB_RUNNING
                and all(
                    t.status == pb.TASK_RUNNING for t in s.jobs[job_id].tasks.values()
                )
            )
        )

    async def ack_all(self, job_id: str, checkpoint_id: int, handle: str = "h") -> None:
        """Acknowledge a checkpoint for every task of the job, as its workers."""
        job = self.state.jobs[job_id]
        for tid, task in sorted(job.tasks.items()):
            await self.tm.AcknowledgeCheckpoint(
                fpb.AcknowledgeCheckpointRequest(
                    job_id=job_id,
                    checkpoint_id=checkpoint_id,
                    task_manager_id=task.task_manager_id,
                    job_vertex_id=task.job_vertex_id,
                    subtask_index=task.subtask_index,
                    snapshot_handle=f"{handle}-{checkpoint_id}-{tid}",
                    source_offsets={"offset": checkpoint_id},
                    snapshot_size=10,
                    duration=1,
                )
            )


async def start_cluster(path: Path, **overrides: Any) -> Cluster:
    coordinator = Coordinator(config(path, **overrides))
    port = await coordinator.start()
    await coordinator.wait_until_leader()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return Cluster(
        coordinator=coordinator,
        channel=channel,
        jm=fpb_grpc.JobManagerInternalServiceStub(channel),
        tm=fpb_grpc.TaskManagerRegistrationStub(channel),
        admin=svc_grpc.AdminServiceStub(channel),
        reporting=svc_grpc.TaskReportingStub(channel),
        workers={},
    )


async def stop_cluster(cluster: Cluster) -> pb.CoordinatorState:
    """Stop everything and return the live state as it was when the
    coordinator stopped leading."""
    engine = cluster.coordinator.engine
    assert engine is not None
    await cluster.channel.close()
    await cluster.coordinator.stop()
    for worker in cluster.workers.values():
        await worker.stop()
    return engine.last_state


async def replayed_state(path: Path) -> pb.CoordinatorState:
    """Replay the log at ``path`` into a fresh state."""
    async with SqliteEventLog(path) as log:
        state, _ = await replay(log)
    return state


def assert_same_state(live: pb.CoordinatorState, replayed: pb.CoordinatorState) -> None:
    """Compare two states field by field, naming the first difference."""
    for field in pb.CoordinatorState.DESCRIPTOR.fields:
        a, b = getattr(live, field.name), getattr(replayed, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            assert sorted(a) == sorted(b), f"{field.name}: keys differ"
            for key in a:
                assert a[key] == b[key], (
                    f"{field.name}[{key!r}] differs:\n{a[key]}\nvs\n{b[key]}"
                )
        else:
            assert a == b, f"{field.name} differs: {a!r} vs {b!r}"
