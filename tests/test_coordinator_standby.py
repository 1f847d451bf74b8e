"""Standbys in this process: following the log, the takeover's reconciliation
with the tasks workers report, and the standby positions in the log."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from coordinator.config import FixedDelayRestart
from coordinator.replay import replay
from coordinator.server import Coordinator
from coordinator.standby import Follower
from eventlog import EventLog, MemoryEventLog, SqliteEventLog, now_ms
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobledger_types_pb2 as types_pb
from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc
from tests.fake_worker import FakeWorker
from tests.harness import Cluster, config, pipeline
from tests.helpers import registered_event

HEARTBEAT_TIMEOUT_S = 3.0

# ------------------------------------------------------------------ helpers


def running(job_id: str, tid: str, attempt: int) -> types_pb.RunningTask:
    vertex, _, index = tid.rpartition("_")
    return types_pb.RunningTask(
        job_id=job_id, job_vertex_id=vertex, subtask_index=int(index), attempt=attempt
    )


async def heartbeat(
    tm: fpb_grpc.TaskManagerRegistrationStub,
    tm_id: str,
    tasks: list[types_pb.RunningTask],
) -> fpb.HeartbeatResponse:
    reply: fpb.HeartbeatResponse = await tm.SendHeartbeat(
        fpb.HeartbeatRequest(task_manager_id=tm_id, incarnation=1, running_tasks=tasks)
    )
    return reply


class Pair:
    """Two coordinators on one log file, the first leading."""

    def __init__(self, first: Coordinator, second: Coordinator) -> None:
        self.first = first
        self.second = second
        self.channels: list[grpc.aio.Channel] = []

    def channel(self, coordinator: Coordinator) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(coordinator.address)
        self.channels.append(channel)
        return channel

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        await self.second.stop()
        await self.first.stop()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    settings = {
        "heartbeat_interval_s": 0.2,
        "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
        "restart": FixedDelayRestart(attempts=5, delay_s=0.1),
    }
    first = Coordinator(config(tmp_path / "log.db", **settings))
    await first.start()
    await first.wait_until_leader()
    second = Coordinator(config(tmp_path / "log.db", **settings))
    await second.start()
    running_pair = Pair(first, second)
    yield running_pair
    await running_pair.close()


async def submit_running(
    coordinator: Coordinator, pair: Pair, worker: FakeWorker
) -> str:
    channel = pair.channel(coordinator)
    tm = fpb_grpc.TaskManagerRegistrationStub(channel)
    await tm.RegisterTaskManager(
        fpb.RegisterTaskManagerRequest(
            task_manager_id="tm-1",
            address="127.0.0.1",
            port=worker.port,
            slots=4,
            incarnation=1,
        )
    )
    jm = fpb_grpc.JobManagerInternalServiceStub(channel)
    reply = await jm.SubmitJob(fpb.SubmitJobRequest(job_graph=pipeline()))
    engine = coordinator.engine
    assert engine is not None
    async with asyncio.timeout(10):
        while not all(
            t.status == pb.TASK_RUNNING
            for t in engine.state.jobs[reply.job_id].tasks.values()
        ):
            await asyncio.sleep(0.01)
    return str(reply.job_id)


async def wait_until(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# ------------------------------------------------------------------ strays


async def test_heartbeat_cancels_stray_attempts(cluster: Cluster) -> None:
    worker = await cluster.add_worker("tm-1")
    job_id = await cluster.submit()
    await cluster.wait_running(job_id)
    tasks = [
        running(job_id, tid, 1) for tid in sorted(cluster.state.jobs[job_id].tasks)
    ]
    stray_attempt = running(job_id, "map_0", 7)
    unknown_job = running("f" * 32, "src_0", 1)
    reply = await heartbeat(cluster.tm, "tm-1", [*tasks, stray_attempt, unknown_job])
    assert reply.acknowledged
    assert reply.leader_epoch == 1
    cancels = await worker.wait_for("CancelTask", count=2)
    assert {(c.job_id, c.job_vertex_id, c.attempt) for c in cancels} == {
        (job_id, "map", 7),
        ("f" * 32, "src", 1),
    }
    assert all(t.attempt == 1 for t in cluster.state.jobs[job_id].tasks.values())
    assert cluster.state.jobs[job_id].status == pb.JOB_RUNNING


async def test_unknown_worker_report_not_acted_on(cluster: Cluster) -> None:
    worker = await cluster.add_worker("tm-1")
    reply = await heartbeat(cluster.tm, "tm-9", [running("f" * 32, "src_0", 1)])
    assert not reply.acknowledged
    await asyncio.sleep(0.2)
    assert worker.of("CancelTask") == []


# ------------------------------------------------------------------ takeover


async def test_standby_follows_and_names_leader(pair: Pair) -> None:
    worker = FakeWorker("tm-1")
    await worker.start()
    try:
        job_id = await submit_running(pair.first, pair, worker)
        leader_engine, standby_engine = pair.first.engine, pair.second.engine
        assert leader_engine is not None and standby_engine is not None
        admin = svc_grpc.AdminServiceStub(pair.channel(pair.first))
        async with asyncio.timeout(10):
            while True:
                overview = await admin.GetOverview(svc.GetOverviewRequest())
                if overview.standbys and (
                    overview.standbys[0].followed_seq == overview.applied_seq
                ):
                    break
                await asyncio.sleep(0.05)
        assert overview.standbys[0].address == pair.second.address
        standby_admin = svc_grpc.AdminServiceStub(pair.channel(pair.second))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await standby_admin.GetJob(svc.GetJobRequest(job_id=job_id))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        hints = [
            value
            for key, value in raised.value.trailing_metadata() or ()
            if key == "jobledger-leader"
        ]
        assert hints == [pair.first.address]
    finally:
        await worker.stop()


async def take_over(pair: Pair) -> None:
    """Stop the first coordinator; it releases the lease to the second."""
    await pair.first.stop()
    await pair.second.wait_until_leader()


async def test_takeover_keeps_listed_tasks(pair: Pair) -> None:
    worker = FakeWorker("tm-1")
    await worker.start()
    try:
        job_id = await submit_running(pair.first, pair, worker)
        await take_over(pair)
        engine = pair.second.engine
        assert engine is not None
        tm = fpb_grpc.TaskManagerRegistrationStub(pair.channel(pair.second))
        tasks = [
            running(job_id, tid, 1) for tid in sorted(engine.state.jobs[job_id].tasks)
        ]
        deadline_ms = engine.state.leader_since_ms + int(HEARTBEAT_TIMEOUT_S * 1500)
        while now_ms() < deadline_ms:
            await heartbeat(tm, "tm-1", tasks)
            await asyncio.sleep(0.1)
        job = engine.state.jobs[job_id]
        assert job.status == pb.JOB_RUNNING
        assert job.restarts == 0
        assert all(t.attempt == 1 for t in job.tasks.values())
        assert worker.of("CancelTask") == []
    finally:
        await worker.stop()


async def test_takeover_fails_gone_task(pair: Pair) -> None:
    worker = FakeWorker("tm-1")
    await worker.start()
    try:
        job_id = await submit_running(pair.first, pair, worker)
        await take_over(pair)
        engine = pair.second.engine
        assert engine is not None
        tm = fpb_grpc.TaskManagerRegistrationStub(pair.channel(pair.second))
        listed = [
            running(job_id, tid, 1)
            for tid in sorted(engine.state.jobs[job_id].tasks)
            if tid != "map_0"
        ]

        async def beat_until_restarted() -> None:
            while engine.state.jobs[job_id].restarts == 0:
                await heartbeat(tm, "tm-1", listed)
                await asyncio.sleep(0.1)

        await asyncio.wait_for(beat_until_restarted(), 10)
        job = engine.state.jobs[job_id]
        assert "task map_0 failed" in job.failure_reason
        assert "no longer runs it after the leader change" in job.failure_reason
        assert engine.state.task_managers["tm-1"].status == pb.TASK_MANAGER_ALIVE
    finally:
        await worker.stop()


# ------------------------------------------------------------------ the log


@pytest.fixture(params=["sqlite", "memory"])
async def log(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[EventLog]:
    opened: EventLog = (
        SqliteEventLog(tmp_path / "log.db")
        if request.param == "sqlite"
        else MemoryEventLog()
    )
    async with opened:
        yield opened


async def test_standby_reports_overwrite(log: EventLog) -> None:
    assert await log.standbys() == []
    await log.report_standby("b", "127.0.0.1:2", 5)
    await log.report_standby("a", "127.0.0.1:1", 3)
    await log.report_standby("b", "127.0.0.1:2", 9)
    reports = await log.standbys()
    assert [(r.coordinator_id, r.followed_seq) for r in reports] == [("a", 3), ("b", 9)]
    assert all(r.reported_ms <= now_ms() for r in reports)
    await log.forget_standby("a")
    await log.forget_standby("missing")
    assert [r.coordinator_id for r in await log.standbys()] == ["b"]


async def test_standby_table_added_to_old_log(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    async with SqliteEventLog(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE standbys")
    async with SqliteEventLog(path) as reopened:
        await reopened.report_standby("a", "127.0.0.1:1", 1)
        assert len(await reopened.standbys()) == 1


# ------------------------------------------------------------------ follower


async def registrations(log: EventLog, epoch: int, count: int, first: int) -> None:
    await log.append([registered_event(f"tm-{first + i}") for i in range(count)], epoch)


async def test_follower_takes_over_followed_state() -> None:
    log = MemoryEventLog()
    lease = await log.acquire_lease("a", "127.0.0.1:1", 10.0)
    assert lease is not None
    follower = Follower(log, "b")
    follower.start()
    await registrations(log, lease.epoch, 3, 0)
    await wait_until(lambda: follower.followed_seq == 4)
    await registrations(log, lease.epoch, 2, 3)
    state = await follower.take_over()
    replayed, _ = await replay(log)
    assert state.applied_seq == 6
    assert state == replayed
    assert follower.state is None


async def test_follower_behind_compaction_replays() -> None:
    log = MemoryEventLog()
    lease = await log.acquire_lease("a", "127.0.0.1:1", 10.0)
    assert lease is not None
    follower = Follower(log, "b")
    follower.start()
    await registrations(log, lease.epoch, 2, 0)
    await wait_until(lambda: follower.followed_seq == 3)
    await follower.stop()
    await registrations(log, lease.epoch, 3, 2)
    current, _ = await replay(log)
    await log.save_snapshot(pb.Snapshot(seq=6, epoch=lease.epoch, state=current))
    assert await log.compact() == 6
    state = await follower.take_over()
    assert state.applied_seq == 6
    assert set(state.task_managers) == {f"tm-{i}" for i in range(5)}
