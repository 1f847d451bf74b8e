"""A coordinator subprocess killed with SIGKILL during traffic, then restarted.

The test process plays the clients and the workers. FakeWorker servers take
the coordinator's deployments and checkpoint triggers, and loops register
them, heartbeat, submit jobs, request checkpoints, acknowledge every
triggered checkpoint for every task and watch completions through the admin
API. After each restart on the same log, everything the coordinator replied
to before the kill must still be there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobmanager_internal_pb2 as fpb
from tests.fake_worker import FakeWorker
from tests.harness import pipeline, replayed_state
from tests.helpers.coordinator_process import CoordinatorProcess, free_port

KILLS = 4
MIN_TRAFFIC_S = 0.3
MAX_TRAFFIC_S = 1.5
MAX_WORKERS = 10
WORKER_SLOTS = 4
MAX_JOBS = 12
JOB_PARALLELISM = 2
INCARNATION = 1
CALL_TIMEOUT_S = 5.0
WAIT_S = 10.0

COORDINATOR_ARGS = [
    # Several pending checkpoints per job, so requests rarely hit the limit.
    "--max-concurrent-checkpoints",
    "8",
    # Every completed checkpoint stays restorable, so any of them can be
    # recovered after a later crash.
    "--retained-checkpoints",
    "1000",
    # Frequent snapshots and compactions, so kills also land during them
    # and restarts replay from a snapshot.
    "--snapshot-every",
    "300",
    "--retain-events",
    "100",
]

Reply = TypeVar("Reply")


def snapshot_handle(checkpoint_id: int, task_id: str) -> str:
    return f"snapshot-{checkpoint_id}-{task_id}"


def source_offsets(checkpoint_id: int) -> dict[str, int]:
    return {"partition-0": checkpoint_id * 100}


@dataclasses.dataclass
class Replied:
    """Everything the coordinator replied to, across all of its processes."""

    jobs: set[str] = dataclasses.field(default_factory=set)
    # Task manager id -> the port it registered.
    task_managers: dict[str, int] = dataclasses.field(default_factory=dict)
    # Ids returned by RequestCheckpoint or carried by a trigger a worker got.
    checkpoint_ids: set[int] = dataclasses.field(default_factory=set)
    # Task manager id -> when the last acknowledged heartbeat was sent, in
    # wall-clock ms. The coordinator stamps the heartbeat's event after it
    # received it, on the same machine's clock, so the replayed
    # last_heartbeat_ms cannot be earlier.
    heartbeat_sent_ms: dict[str, int] = dataclasses.field(default_factory=dict)
    # Checkpoint id -> job id, for every checkpoint ListCheckpoints reported
    # as completed.
    completed: dict[int, str] = dataclasses.field(default_factory=dict)
    # Errors that no kill explains, as "Method: CODE: details".
    unexpected: list[str] = dataclasses.field(default_factory=list)


class Traffic:
    """The client and worker loops against the coordinator's current process."""

    def __init__(
        self,
        coordinator: CoordinatorProcess,
        workers: dict[str, FakeWorker],
        replied: Replied,
        rng: random.Random,
    ) -> None:
        self.coordinator = coordinator
        self.workers = workers
        self.replied = replied
        self.rng = rng
        # Checkpoint ids the ack loop has acknowledged (or tried to).
        self.acknowledged: set[int] = set()
        # Checkpoints observed as completed since this phase began.
        self.completed_in_phase: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.completed_in_phase = set()
        loops = (
            self._register_loop,
            self._heartbeat_loop,
            self._submit_loop,
            self._checkpoint_loop,
            self._ack_loop,
            self._observe_loop,
        )
        self._tasks = [asyncio.create_task(loop()) for loop in loops]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(
                result, asyncio.CancelledError
            ):
                raise result
        self._tasks = []

    async def call(
        self,
        method: str,
        request: Awaitable[Reply],
        expected: tuple[grpc.StatusCode, ...] = (),
    ) -> Reply | None:
        """Await one RPC; return None for a failure a kill or ``expected`` explains.

        Any other failure is recorded in ``replied.unexpected``. A live
        coordinator that is not the leader also returns UNAVAILABLE, with a
        message that contains "not the leader", and no kill explains that.
        """
        try:
            return await request
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code in expected:
                return None
            if code == grpc.StatusCode.UNAVAILABLE and "not the leader" not in details:
                return None
            self.replied.unexpected.append(f"{method}: {code.name}: {details}")
            return None

    # ------------------------------------------------------------ workers

    async def register(self, worker: FakeWorker) -> None:
        request = fpb.RegisterTaskManagerRequest(
            task_manager_id=worker.task_manager_id,
            address="127.0.0.1",
            port=worker.port,
            slots=WORKER_SLOTS,
            incarnation=INCARNATION,
        )
        reply = await self.call(
            "RegisterTaskManager",
            self.coordinator.tm.RegisterTaskManager(request, timeout=CALL_TIMEOUT_S),
        )
        if reply is not None and reply.success:
            self.replied.task_managers[worker.task_manager_id] = worker.port

    async def _register_loop(self) -> None:
        while len(self.workers) < MAX_WORKERS:
            worker = FakeWorker(f"tm-{len(self.workers) + 1}")
            await worker.start()
            self.workers[worker.task_manager_id] = worker
            await self.register(worker)
            await asyncio.sleep(self.rng.uniform(0.2, 0.5))

    async def heartbeat(self, worker: FakeWorker) -> None:
        """Heartbeat once, and register again when the coordinator returns
        acknowledged=false, as a real worker does."""
        request = fpb.HeartbeatRequest(
            task_manager_id=worker.task_manager_id, incarnation=INCARNATION
        )
        sent_ms = time.time_ns() // 1_000_000
        reply = await self.call(
            "SendHeartbeat",
            self.coordinator.tm.SendHeartbeat(request, timeout=CALL_TIMEOUT_S),
        )
        if reply is not None and reply.acknowledged:
            self.replied.heartbeat_sent_ms[worker.task_manager_id] = sent_ms
        if reply is not None and not reply.acknowledged:
            await self.register(worker)

    async def _heartbeat_loop(self) -> None:
        while True:
            workers = list(self.workers.values())
            await asyncio.gather(*(self.heartbeat(worker) for worker in workers))
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------ jobs

    async def _submit_loop(self) -> None:
        while len(self.replied.jobs) < MAX_JOBS:
            graph = pipeline(JOB_PARALLELISM, name=f"crash-{len(self.replied.jobs)}")
            reply = await self.call(
                "SubmitJob",
                self.coordinator.jm.SubmitJob(
                    fpb.SubmitJobRequest(job_graph=graph), timeout=CALL_TIMEOUT_S
                ),
            )
            if reply is not None and reply.success:
                self.replied.jobs.add(reply.job_id)
            await asyncio.sleep(self.rng.uniform(0.1, 0.3))

    # ------------------------------------------------------------ checkpoints

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.rng.uniform(0.05, 0.1))
            if not self.replied.jobs:
                continue
            job_id = self.rng.choice(sorted(self.replied.jobs))
            # The coordinator rejects the request with FAILED_PRECONDITION while
            # tasks are not running yet or too many checkpoints are pending.
            reply = await self.call(
                "RequestCheckpoint",
                self.coordinator.jm.RequestCheckpoint(
                    fpb.RequestCheckpointRequest(job_id=job_id),
                    timeout=CALL_TIMEOUT_S,
                ),
                expected=(grpc.StatusCode.FAILED_PRECONDITION,),
            )
            if reply is not None:
                self.replied.checkpoint_ids.update(reply.checkpoint_ids)

    def triggers(self) -> list[fpb.TriggerCheckpointRequest]:
        """Return every trigger any worker got, from any coordinator process."""
        return [
            request
            for worker in list(self.workers.values())
            for request in worker.of("TriggerTaskCheckpoint")
        ]

    async def acknowledge(self, job_id: str, checkpoint_id: int) -> None:
        """Acknowledge a checkpoint for every task of its job, one RPC per task."""
        job = await self.call(
            "GetJob",
            self.coordinator.admin.GetJob(
                svc.GetJobRequest(job_id=job_id), timeout=CALL_TIMEOUT_S
            ),
        )
        if job is None:
            return
        for tid, task in sorted(job.tasks.items()):
            request = fpb.AcknowledgeCheckpointRequest(
                job_id=job_id,
                checkpoint_id=checkpoint_id,
                task_manager_id=task.task_manager_id,
                job_vertex_id=task.job_vertex_id,
                subtask_index=task.subtask_index,
                snapshot_handle=snapshot_handle(checkpoint_id, tid),
                source_offsets=source_offsets(checkpoint_id),
                snapshot_size=100,
                duration=1,
            )
            reply = await self.call(
                "AcknowledgeCheckpoint",
                self.coordinator.tm.AcknowledgeCheckpoint(
                    request, timeout=CALL_TIMEOUT_S
                ),
            )
            if reply is None:
                return

    async def _ack_loop(self) -> None:
        while True:
            for trigger in self.triggers():
                self.replied.checkpoint_ids.add(trigger.checkpoint_id)
                if trigger.checkpoint_id in self.acknowledged:
                    continue
                self.acknowledged.add(trigger.checkpoint_id)
                await self.acknowledge(trigger.job_id, trigger.checkpoint_id)
            await asyncio.sleep(0.02)

    async def _observe_loop(self) -> None:
        # The admin queries reply only once what they show is durable, so a
        # checkpoint seen completed here survives any later kill.
        while True:
            for job_id in sorted(self.replied.jobs):
                listing = await self.call(
                    "ListCheckpoints",
                    self.coordinator.admin.ListCheckpoints(
                        svc.ListCheckpointsRequest(job_id=job_id),
                        timeout=CALL_TIMEOUT_S,
                    ),
                )
                if listing is None:
                    continue
                for summary in listing.checkpoints:
                    if summary.status == pb.CHECKPOINT_COMPLETED:
                        cid = summary.checkpoint_id
                        if cid not in self.replied.completed:
                            self.completed_in_phase.add(cid)
                        self.replied.completed[cid] = job_id
            await asyncio.sleep(0.1)


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], what: str, timeout_s: float = WAIT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def job_running(coordinator: CoordinatorProcess, job_id: str) -> bool:
    job = await coordinator.admin.GetJob(svc.GetJobRequest(job_id=job_id))
    return job.status == pb.JOB_RUNNING and all(
        task.status == pb.TASK_RUNNING for task in job.tasks.values()
    )


async def request_any_checkpoint(coordinator: CoordinatorProcess) -> list[int]:
    """Request checkpoints of every job that can take one, until one does."""
    deadline = time.monotonic() + WAIT_S
    while True:
        reply = await coordinator.jm.RequestCheckpoint(fpb.RequestCheckpointRequest())
        if reply.checkpoint_ids:
            return list(reply.checkpoint_ids)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no job could be checkpointed within {WAIT_S} s")
        await asyncio.sleep(0.05)


def deployments(
    workers: dict[str, FakeWorker], job_id: str
) -> list[fpb.TaskDeploymentDescriptor]:
    return [
        request
        for worker in workers.values()
        for request in worker.of("DeployTask")
        if request.job_graph_job_id == job_id
    ]


async def recover(
    coordinator: CoordinatorProcess,
    workers: dict[str, FakeWorker],
    job_id: str,
    checkpoint_id: int,
) -> dict[str, fpb.TaskDeploymentDescriptor]:
    """Recover the job from the checkpoint and return each task's new deployment."""
    job = await coordinator.admin.GetJob(svc.GetJobRequest(job_id=job_id))
    next_attempt = {tid: task.attempt + 1 for tid, task in job.tasks.items()}
    reply = await coordinator.jm.RequestRecovery(
        fpb.RequestRecoveryRequest(job_id=job_id, checkpoint_id=checkpoint_id)
    )
    assert reply.recovery_initiated
    assert reply.checkpoint_id == checkpoint_id

    redeployed: dict[str, fpb.TaskDeploymentDescriptor] = {}

    async def all_redeployed() -> bool:
        for descriptor in deployments(workers, job_id):
            tid = f"{descriptor.job_vertex_id}_{descriptor.subtask_index}"
            if descriptor.attempt == next_attempt.get(tid):
                redeployed[tid] = descriptor
        return len(redeployed) == len(next_attempt)

    await wait_until(all_redeployed, f"redeployment of job {job_id}")
    return redeployed


async def check_after_restart(
    coordinator: CoordinatorProcess,
    traffic: Traffic,
    replied: Replied,
    completed_before: set[int],
    rng: random.Random,
) -> None:
    """Check that everything replied to before the kill survived the restart."""
    admin = coordinator.admin
    jobs = await admin.ListJobs(svc.ListJobsRequest())
    lost_jobs = replied.jobs - {job.job_id for job in jobs.jobs}
    assert not lost_jobs, f"submitted jobs lost: {sorted(lost_jobs)}"

    listing = await admin.ListTaskManagers(svc.ListTaskManagersRequest())
    task_managers = {
        summary.task_manager.task_manager_id: summary.task_manager
        for summary in listing.task_managers
    }
    lost_task_managers = set(replied.task_managers) - set(task_managers)
    assert not lost_task_managers, f"registrations lost: {sorted(lost_task_managers)}"
    for tm_id, port in replied.task_managers.items():
        assert task_managers[tm_id].port == port, f"port of {tm_id}"
    for tm_id, sent_ms in sorted(replied.heartbeat_sent_ms.items()):
        last_ms = task_managers[tm_id].last_heartbeat_ms
        assert last_ms >= sent_ms, (
            f"{tm_id}: a heartbeat sent at {sent_ms} ms was acknowledged, but the "
            f"last heartbeat after the restart is at {last_ms} ms"
        )

    for job_id in sorted(set(replied.completed.values())):
        checkpoints = await admin.ListCheckpoints(
            svc.ListCheckpointsRequest(job_id=job_id)
        )
        status = {c.checkpoint_id: c.status for c in checkpoints.checkpoints}
        for cid in sorted(c for c, j in replied.completed.items() if j == job_id):
            assert status.get(cid) == pb.CHECKPOINT_COMPLETED, (
                f"checkpoint {cid} of job {job_id} was reported completed before "
                f"the kill, but is {pb.CheckpointStatus.Name(status.get(cid, 0))} "
                "after the restart"
            )

    # A worker whose registration got a reply is known after the restart.
    for tm_id in sorted(replied.task_managers):
        heartbeat = await coordinator.tm.SendHeartbeat(
            fpb.HeartbeatRequest(task_manager_id=tm_id, incarnation=INCARNATION)
        )
        assert heartbeat.acknowledged, f"heartbeat of {tm_id} not acknowledged"

    highest_seen = max(replied.checkpoint_ids)
    new_ids = await request_any_checkpoint(coordinator)
    assert min(new_ids) > highest_seen, (
        f"new checkpoint ids {new_ids} do not ascend past {highest_seen}"
    )
    replied.checkpoint_ids.update(new_ids)

    # Recover from a checkpoint that completed just before the kill when
    # there is one, and from an older one otherwise.
    candidates = completed_before & traffic.completed_in_phase
    if not candidates:
        candidates = completed_before
    checkpoint_id = rng.choice(sorted(candidates))
    job_id = replied.completed[checkpoint_id]
    redeployed = await recover(coordinator, traffic.workers, job_id, checkpoint_id)
    for tid, descriptor in sorted(redeployed.items()):
        assert descriptor.is_recovery, f"{tid} deployed without is_recovery"
        assert descriptor.recovery_checkpoint_id == checkpoint_id, tid
        assert descriptor.recovery_snapshot_handle == snapshot_handle(
            checkpoint_id, tid
        ), tid
        assert dict(descriptor.recovery_source_offsets) == source_offsets(
            checkpoint_id
        ), tid
    await wait_until(
        lambda: job_running(coordinator, job_id), f"job {job_id} running again"
    )


async def wait_quiescent(coordinator: CoordinatorProcess) -> None:
    """Wait until every job runs or waits for slots, with no task deploying."""

    async def quiescent() -> bool:
        jobs = await coordinator.admin.ListJobs(svc.ListJobsRequest())
        for summary in jobs.jobs:
            job = await coordinator.admin.GetJob(
                svc.GetJobRequest(job_id=summary.job_id)
            )
            settled = job.status in (pb.JOB_CREATED, pb.JOB_RUNNING) and all(
                task.status in (pb.TASK_CREATED, pb.TASK_RUNNING)
                for task in job.tasks.values()
            )
            if not settled:
                return False
        return True

    await wait_until(quiescent, "every job settled")


@dataclasses.dataclass
class LiveView:
    """What the last live coordinator reported through the admin API."""

    overview: svc.Overview
    jobs: dict[str, pb.JobState]
    task_managers: dict[str, pb.TaskManagerState]
    checkpoints: dict[str, list[svc.CheckpointSummary]]


async def read_live_view(coordinator: CoordinatorProcess) -> LiveView:
    admin = coordinator.admin
    overview = await admin.GetOverview(svc.GetOverviewRequest())
    listing = await admin.ListJobs(svc.ListJobsRequest())
    jobs: dict[str, pb.JobState] = {}
    checkpoints: dict[str, list[svc.CheckpointSummary]] = {}
    for summary in listing.jobs:
        jobs[summary.job_id] = await admin.GetJob(
            svc.GetJobRequest(job_id=summary.job_id)
        )
        reply = await admin.ListCheckpoints(
            svc.ListCheckpointsRequest(job_id=summary.job_id)
        )
        checkpoints[summary.job_id] = list(reply.checkpoints)
    task_managers = await admin.ListTaskManagers(svc.ListTaskManagersRequest())
    return LiveView(
        overview=overview,
        jobs=jobs,
        task_managers={
            s.task_manager.task_manager_id: s.task_manager
            for s in task_managers.task_managers
        },
        checkpoints=checkpoints,
    )


@pytest.mark.timeout(120)
async def test_sigkill_keeps_replied_state(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    rng = random.Random(random.SystemRandom().randrange(1 << 32))
    coordinator = CoordinatorProcess(db, free_port(), tmp_path, COORDINATOR_ARGS)
    workers: dict[str, FakeWorker] = {}
    replied = Replied()
    traffic = Traffic(coordinator, workers, replied, rng)
    epochs: list[int] = []
    kill_statuses: list[int] = []
    try:
        overview = await coordinator.start()
        epochs.append(overview.epoch)
        for kill in range(KILLS):
            traffic.start()
            if kill == 0:

                async def any_completed() -> bool:
                    return bool(replied.completed)

                await wait_until(any_completed, "a first completed checkpoint")
            await asyncio.sleep(rng.uniform(MIN_TRAFFIC_S, MAX_TRAFFIC_S))
            kill_statuses.append(await coordinator.kill())
            await traffic.stop()
            completed_before = set(replied.completed)

            overview = await coordinator.start()
            epochs.append(overview.epoch)
            assert not replied.unexpected, f"unexpected errors: {replied.unexpected}"
            await check_after_restart(
                coordinator, traffic, replied, completed_before, rng
            )

        await wait_quiescent(coordinator)
        live = await read_live_view(coordinator)
        status = await coordinator.terminate()
    finally:
        with contextlib.suppress(Exception):
            await traffic.stop()
        await coordinator.close()
        for worker in workers.values():
            await worker.stop()

    assert kill_statuses == [-signal.SIGKILL] * KILLS
    assert epochs == sorted(set(epochs)), f"epochs do not ascend: {epochs}"
    assert status == 0, coordinator.log_tail()
    assert len(replied.jobs) >= 2
    assert len(replied.completed) >= 2

    replayed = await replayed_state(db)
    assert replayed.applied_seq == live.overview.applied_seq
    assert replayed.epoch == live.overview.epoch
    assert sorted(replayed.jobs) == sorted(live.jobs)
    for job_id, job in live.jobs.items():
        assert replayed.jobs[job_id].status == job.status, f"status of job {job_id}"
        assert replayed.jobs[job_id] == job, f"job {job_id} differs after replay"
    assert sorted(replayed.task_managers) == sorted(live.task_managers)
    for tm_id, tm in live.task_managers.items():
        assert replayed.task_managers[tm_id] == tm, f"task manager {tm_id} differs"
    listed = {c.checkpoint_id for cs in live.checkpoints.values() for c in cs}
    assert sorted(replayed.checkpoints) == sorted(listed)
    for summaries in live.checkpoints.values():
        for summary in summaries:
            checkpoint = replayed.checkpoints[summary.checkpoint_id]
            assert checkpoint.status == summary.status, summary.checkpoint_id
            acknowledged = len(checkpoint.acknowledgements)
            assert acknowledged == summary.acknowledged_tasks, summary.checkpoint_id
