"""High availability with real processes: coordinators on one log file, one
leading and the others standing by, and real workers running a job.

The leader is killed with SIGKILL or paused with SIGSTOP while the job runs
and checkpoints. A standby must take over within the lease plus one renewal
period, the job must keep running with the same attempts, its output must
stay exactly-once, and the log must never hold the events of two leaders
in one epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from eventlog import SqliteEventLog
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc
from tests.helpers.coordinator_process import (
    REPO_ROOT,
    CoordinatorProcess,
    free_port,
)
from tests.worker_helpers.jobs import (
    expected_rolling_sums,
    keyed_sum_graph,
    read_append_outputs,
    write_events,
)

pytestmark = pytest.mark.timeout(150)

LEASE_S = 2.0
RENEWAL_S = LEASE_S / 3
HEARTBEAT_TIMEOUT_S = 5.0
COORDINATOR_ARGS = [
    "--lease",
    str(LEASE_S),
    "--checkpoint-interval",
    "0.3",
    "--heartbeat-interval",
    "0.2",
    "--heartbeat-timeout",
    str(HEARTBEAT_TIMEOUT_S),
    "--restart-strategy",
    "fixed-delay",
    "--restart-attempts",
    "20",
    "--restart-delay",
    "0.1",
]
WAIT_S = 30.0
LEADER_KEY = "jobledger-leader"
EPOCH_KEY = "jobledger-leader-epoch"


# ------------------------------------------------------------------ processes


class WorkerProcess:
    """A real worker subprocess, given every coordinator's address."""

    def __init__(self, name: str, state_dir: Path, log_path: Path) -> None:
        self.name = name
        self.state_dir = state_dir
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, coordinators: list[CoordinatorProcess]) -> None:
        addresses = ",".join(c.address for c in coordinators)
        with self.log_path.open("wb") as output:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.worker_helpers.run_worker",
                "--coordinator",
                addresses,
                "--listen",
                "127.0.0.1:0",
                "--slots",
                "4",
                "--state-dir",
                str(self.state_dir),
                "--id",
                self.name,
                "--heartbeat-interval",
                "0.2",
                cwd=REPO_ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            )

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


class Ensemble:
    """Coordinators on one log file and the workers that follow them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.db = tmp_path / "log.db"
        self.coordinators: list[CoordinatorProcess] = []
        self.workers: list[WorkerProcess] = []

    def add_coordinators(self, count: int) -> None:
        for _ in range(count):
            self.coordinators.append(
                CoordinatorProcess(
                    self.db, free_port(), self.tmp_path, COORDINATOR_ARGS
                )
            )

    async def start_leader_and_standbys(self) -> CoordinatorProcess:
        """Start the first coordinator as leader, then the others."""
        first, *others = self.coordinators
        await first.start(WAIT_S)
        for standby in others:
            await standby.launch()
        for standby in others:
            await wait_standing_by(standby, first)
        return first

    async def start_workers(self, leader: CoordinatorProcess, count: int) -> None:
        for index in range(count):
            name = f"tm-{index}"
            worker = WorkerProcess(
                name, self.tmp_path / "state" / name, self.tmp_path / f"{name}.log"
            )
            self.workers.append(worker)
            await worker.start(self.coordinators)
        names = {w.name for w in self.workers}
        await poll(
            lambda: task_managers(leader),
            lambda tms: names <= {tm.task_manager.task_manager_id for tm in tms},
            "every worker registered",
        )

    async def leader(self) -> CoordinatorProcess:
        """Return the coordinator that serves as leader now."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for coordinator in self.live():
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await coordinator.admin.GetOverview(
                        svc.GetOverviewRequest(), timeout=1.0
                    )
                    return coordinator
            await asyncio.sleep(0.05)
        raise AssertionError(f"no coordinator leads after {WAIT_S} s\n{self.logs()}")

    def live(self) -> list[CoordinatorProcess]:
        return [
            c
            for c in self.coordinators
            if c.process is not None and c.process.returncode is None
        ]

    def logs(self) -> str:
        return "\n".join(
            f"--- {c.address}:\n{c.log_tail(15)}" for c in self.coordinators
        )

    async def close(self) -> None:
        for worker in self.workers:
            await worker.close()
        for coordinator in self.coordinators:
            with contextlib.suppress(ProcessLookupError):
                if coordinator.process is not None:
                    coordinator.process.send_signal(signal.SIGCONT)
            await coordinator.close()


@pytest.fixture
async def ensemble(tmp_path: Path) -> AsyncIterator[Ensemble]:
    running = Ensemble(tmp_path)
    try:
        yield running
    finally:
        await running.close()


# ------------------------------------------------------------------ polling


async def poll(
    fetch: Callable[[], Any],
    done: Callable[[Any], bool],
    what: str,
    timeout_s: float = WAIT_S,
) -> Any:
    """Call ``fetch`` until ``done`` holds for its result; UNAVAILABLE and
    deadline errors count as not done yet."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await fetch()
            if done(last):
                return last
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                raise
            last = exc
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: {last}")


async def task_managers(
    coordinator: CoordinatorProcess,
) -> list[svc.TaskManagerSummary]:
    reply = await coordinator.admin.ListTaskManagers(
        svc.ListTaskManagersRequest(), timeout=2.0
    )
    return list(reply.task_managers)


async def get_job(coordinator: CoordinatorProcess, job_id: str) -> pb.JobState:
    job: pb.JobState = await coordinator.admin.GetJob(
        svc.GetJobRequest(job_id=job_id), timeout=2.0
    )
    return job


async def wait_standing_by(
    standby: CoordinatorProcess, leader: CoordinatorProcess
) -> None:
    """Wait until ``standby`` answers UNAVAILABLE naming ``leader``."""

    async def hint() -> str:
        try:
            await standby.admin.GetOverview(svc.GetOverviewRequest(), timeout=1.0)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return leader_hint(exc)
        return "(it leads)"

    await poll(hint, lambda h: h == leader.address, f"{standby.address} to stand by")


def leader_hint(exc: grpc.aio.AioRpcError) -> str:
    for key, value in exc.trailing_metadata() or ():
        if key == LEADER_KEY:
            return str(value)
    return ""


async def read_log(db: Path) -> list[pb.Event]:
    log = SqliteEventLog(db)
    async with log:
        return [event async for event in log.read()]


def elections(events: list[pb.Event]) -> dict[int, pb.Event]:
    """Map each epoch to its LeaderElected event; fail on a repeated epoch."""
    elected: dict[int, pb.Event] = {}
    for event in events:
        if event.WhichOneof("body") == "leader_elected":
            epoch = event.leader_elected.epoch
            assert epoch not in elected, f"epoch {epoch} was elected twice"
            elected[epoch] = event
    return elected


def assert_one_leader_per_epoch(events: list[pb.Event]) -> None:
    """Every event lies between its epoch's election and the next one."""
    current = 0
    for event in events:
        if event.WhichOneof("body") == "leader_elected":
            assert event.epoch > current, (
                f"seq {event.seq}: epoch {event.epoch} elected after epoch {current}"
            )
            current = event.epoch
        assert event.epoch == current, (
            f"seq {event.seq} ({event.WhichOneof('body')}) was written at epoch "
            f"{event.epoch} while epoch {current} led"
        )


async def submit_job(
    leader: CoordinatorProcess, tmp_path: Path, rows: int, delay_ms: float
) -> tuple[str, list[dict[str, Any]]]:
    events = write_events(tmp_path / "events.csv", rows)
    graph = keyed_sum_graph(
        tmp_path / "events.csv",
        tmp_path / "out",
        delay_ms=delay_ms,
        mode="append",
        source_parallelism=1,
    )
    reply = await leader.jm.SubmitJob(fpb.SubmitJobRequest(job_graph=graph))
    return reply.job_id, events


def attempts(job: pb.JobState) -> dict[str, int]:
    return {tid: task.attempt for tid, task in job.tasks.items()}


async def wait_running_with_checkpoint(
    leader: CoordinatorProcess, job_id: str
) -> pb.JobState:
    job: pb.JobState = await poll(
        lambda: get_job(leader, job_id),
        lambda j: (
            j.status == pb.JOB_RUNNING
            and j.latest_completed_checkpoint_id > 0
            and all(t.status == pb.TASK_RUNNING for t in j.tasks.values())
        ),
        f"job {job_id} running with a completed checkpoint",
    )
    return job


async def wait_finished(coordinator: CoordinatorProcess, job_id: str) -> pb.JobState:
    job: pb.JobState = await poll(
        lambda: get_job(coordinator, job_id),
        lambda j: j.status in (pb.JOB_FINISHED, pb.JOB_FAILED, pb.JOB_CANCELED),
        f"job {job_id} to end",
        timeout_s=60.0,
    )
    return job


# ------------------------------------------------------------------ SIGKILL


async def test_sigkill_leader_job_keeps_running(
    ensemble: Ensemble, tmp_path: Path
) -> None:
    ensemble.add_coordinators(2)
    leader = await ensemble.start_leader_and_standbys()
    standby = ensemble.coordinators[1]
    await ensemble.start_workers(leader, 2)
    job_id, rows = await submit_job(leader, tmp_path, rows=2000, delay_ms=4)
    before = await wait_running_with_checkpoint(leader, job_id)

    # The leader's overview names the standby and how far it followed.
    overview = await poll(
        lambda: leader.admin.GetOverview(svc.GetOverviewRequest(), timeout=2.0),
        lambda o: len(o.standbys) == 1 and o.standbys[0].followed_seq > 0,
        "the standby in the overview",
    )
    assert overview.epoch == 1
    assert overview.leader_address == leader.address
    assert overview.standbys[0].address == standby.address
    assert overview.standbys[0].followed_seq <= overview.applied_seq

    killed_ms = time.time_ns() // 1_000_000
    assert await leader.kill() == -signal.SIGKILL
    overview = await standby.wait_serving(WAIT_S)
    assert overview.epoch == 2
    assert overview.leader_address == standby.address

    after = await wait_finished(standby, job_id)
    assert after.status == pb.JOB_FINISHED, after.failure_reason
    assert after.restarts == 0
    assert attempts(after) == attempts(before) == dict.fromkeys(before.tasks, 1)
    assert read_append_outputs(tmp_path / "out", 2) == expected_rolling_sums(rows)

    events = await read_log(ensemble.db)
    assert_one_leader_per_epoch(events)
    elected = elections(events)
    took_over_ms = elected[2].timestamp.ToMilliseconds() - killed_ms
    assert took_over_ms <= (LEASE_S + RENEWAL_S) * 1000, (
        f"the standby took the lease {took_over_ms} ms after the kill"
    )
    assert_checkpoints_continue(events, elected[2].seq)


def assert_checkpoints_continue(events: list[pb.Event], takeover_seq: int) -> None:
    """Ids issued after the takeover ascend past the old leader's, its pending
    checkpoints were aborted, and the periodic trigger runs again."""
    old = [e for e in events if e.seq < takeover_seq]
    new = [e for e in events if e.seq > takeover_seq]
    old_ids = {
        e.checkpoint_triggered.checkpoint_id
        for e in old
        if e.WhichOneof("body") == "checkpoint_triggered"
    }
    ended_ids = {
        getattr(e, e.WhichOneof("body") or "").checkpoint_id
        for e in old
        if e.WhichOneof("body") in ("checkpoint_completed", "checkpoint_failed")
    }
    new_ids = [
        e.checkpoint_triggered.checkpoint_id
        for e in new
        if e.WhichOneof("body") == "checkpoint_triggered"
    ]
    aborted = {
        e.checkpoint_failed.checkpoint_id
        for e in new
        if e.WhichOneof("body") == "checkpoint_failed"
        and e.checkpoint_failed.message == "the leader changed"
    }
    assert old_ids, "the old leader triggered no checkpoint"
    assert new_ids, "the new leader triggered no checkpoint"
    assert min(new_ids) > max(old_ids)
    assert aborted == old_ids - ended_ids
    completed_after = [e for e in new if e.WhichOneof("body") == "checkpoint_completed"]
    assert completed_after, "no checkpoint completed after the takeover"


# ------------------------------------------------------------------ SIGSTOP


def write_lock_free(db: Path) -> bool:
    """Return whether no process holds the log's write lock right now."""
    conn = sqlite3.connect(db, timeout=0.0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


async def pause_outside_transaction(coordinator: CoordinatorProcess, db: Path) -> None:
    """SIGSTOP the coordinator at a moment it holds no SQLite write lock.

    A process paused inside a write transaction keeps SQLite's lock, so no
    standby can take over until it resumes. That limit of an embedded log
    on one host is not what this test is about.
    """
    assert coordinator.process is not None
    for _ in range(20):
        coordinator.process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(0.05)
        if write_lock_free(db):
            return
        coordinator.process.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.02)
    raise AssertionError("the coordinator held the write lock at every pause")


async def test_sigstop_old_leader_steps_down(
    ensemble: Ensemble, tmp_path: Path
) -> None:
    ensemble.add_coordinators(2)
    old, new = ensemble.coordinators
    await ensemble.start_leader_and_standbys()
    await ensemble.start_workers(old, 1)
    job_id, rows = await submit_job(old, tmp_path, rows=1500, delay_ms=4)
    before = await wait_running_with_checkpoint(old, job_id)
    (worker_tm,) = await task_managers(old)
    endpoint = f"{worker_tm.task_manager.address}:{worker_tm.task_manager.port}"

    await pause_outside_transaction(old, ensemble.db)
    overview = await new.wait_serving(WAIT_S)
    assert overview.epoch == 2
    elected_ms = await election_time(ensemble.db, 2)
    await poll(
        lambda: task_managers(new),
        lambda tms: tms[0].task_manager.last_heartbeat_ms > elected_ms,
        "a heartbeat to the new leader",
    )

    assert old.process is not None
    old.process.send_signal(signal.SIGCONT)
    await wait_standing_by(old, new)
    assert "stops leading at epoch 1" in old.log_tail(400)

    # The worker saw epoch 2, so what the old leader might still send is
    # rejected: a trigger, and a cancellation of the running source.
    await assert_worker_rejects_epoch(endpoint, job_id, epoch=1)
    job = await get_job(new, job_id)
    assert job.tasks["src_0"].status == pb.TASK_RUNNING

    after = await wait_finished(new, job_id)
    assert after.status == pb.JOB_FINISHED, after.failure_reason
    assert attempts(after) == attempts(before)
    assert read_append_outputs(tmp_path / "out", 2) == expected_rolling_sums(rows)

    events = await read_log(ensemble.db)
    assert_one_leader_per_epoch(events)
    takeover_seq = elections(events)[2].seq
    late = [e.seq for e in events if e.epoch == 1 and e.seq > takeover_seq]
    assert late == [], f"events of the old leader landed after the takeover: {late}"


async def election_time(db: Path, epoch: int) -> int:
    return elections(await read_log(db))[epoch].timestamp.ToMilliseconds()


async def assert_worker_rejects_epoch(endpoint: str, job_id: str, epoch: int) -> None:
    metadata = ((EPOCH_KEY, str(epoch)),)
    async with grpc.aio.insecure_channel(endpoint) as channel:
        checkpointing = fpb_grpc.TaskManagerCheckpointingStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await checkpointing.TriggerTaskCheckpoint(
                fpb.TriggerCheckpointRequest(job_id=job_id, checkpoint_id=10_000),
                metadata=metadata,
                timeout=5.0,
            )
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stale" in (raised.value.details() or "")
        execution = fpb_grpc.TaskExecutionStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await execution.DeployTask(
                fpb.TaskDeploymentDescriptor(
                    job_graph_job_id=job_id, job_vertex_id="src", attempt=2
                ),
                metadata=metadata,
                timeout=5.0,
            )
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# ------------------------------------------------------------------ repeated


async def test_five_takeovers_one_leader_per_epoch(
    ensemble: Ensemble, tmp_path: Path
) -> None:
    ensemble.add_coordinators(3)
    leader = await ensemble.start_leader_and_standbys()
    await ensemble.start_workers(leader, 1)
    standby = next(c for c in ensemble.coordinators if c is not leader)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await standby.jm.RequestCheckpoint(fpb.RequestCheckpointRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert leader_hint(raised.value) == leader.address

    for round_number in range(1, 6):
        await leader.kill()
        new_leader = await ensemble.leader()
        overview = await new_leader.admin.GetOverview(svc.GetOverviewRequest())
        assert overview.epoch == round_number + 1
        # The worker follows the new leader, which keeps it alive.
        elected_ms = await election_time(ensemble.db, round_number + 1)
        await poll(
            lambda c=new_leader: task_managers(c),
            lambda tms, since=elected_ms: tms[0].task_manager.last_heartbeat_ms > since,
            "a heartbeat to the new leader",
        )
        await leader.launch()
        await wait_standing_by(leader, new_leader)
        leader = new_leader

    overview = await poll(
        lambda: leader.admin.GetOverview(svc.GetOverviewRequest(), timeout=2.0),
        lambda o: len(o.standbys) == 2,
        "both standbys in the overview",
    )
    assert {s.address for s in overview.standbys} == {
        c.address for c in ensemble.coordinators if c is not leader
    }
    events = await read_log(ensemble.db)
    assert sorted(elections(events)) == [1, 2, 3, 4, 5, 6]
    assert_one_leader_per_epoch(events)
    (tm,) = await task_managers(leader)
    assert tm.task_manager.registration_id == 1, "the worker had to register again"


# ------------------------------------------------------------------ finishing


async def test_job_finishing_at_kill_stays_finished(
    ensemble: Ensemble, tmp_path: Path
) -> None:
    ensemble.add_coordinators(2)
    leader, standby = ensemble.coordinators
    await ensemble.start_leader_and_standbys()
    await ensemble.start_workers(leader, 2)
    job_id, rows = await submit_job(leader, tmp_path, rows=600, delay_ms=2)
    assert leader.process is not None

    # Kill the leader as the first task reports FINISHED, so that the other
    # reports reach the new leader, or the job finished just before.
    watch = leader.admin.WatchEvents(svc.WatchEventsRequest(from_seq=1))
    async for event in watch:
        changed = event.task_status_changed
        if (
            event.WhichOneof("body") == "task_status_changed"
            and changed.status == pb.TASK_FINISHED
        ):
            leader.process.send_signal(signal.SIGKILL)
            break
    watch.cancel()
    await leader.process.wait()

    await standby.wait_serving(WAIT_S)
    job = await wait_finished(standby, job_id)
    assert job.status == pb.JOB_FINISHED, job.failure_reason
    assert job.restarts == 0
    assert read_append_outputs(tmp_path / "out", 2) == expected_rolling_sums(rows)

    # A further takeover leaves the finished job alone.
    await leader.launch()
    await wait_standing_by(leader, standby)
    await standby.kill()
    await leader.wait_serving(WAIT_S)
    job = await get_job(leader, job_id)
    assert job.status == pb.JOB_FINISHED
    events = await read_log(ensemble.db)
    assert_one_leader_per_epoch(events)
    finished_seq = max(
        e.seq
        for e in events
        if e.WhichOneof("body") == "job_status_changed"
        and e.job_status_changed.job_id == job_id
    )
    touched = [
        e.WhichOneof("body")
        for e in events
        if e.seq > finished_seq
        and e.WhichOneof("body")
        in ("tasks_assigned", "job_restarted", "checkpoint_triggered")
    ]
    assert touched == [], "the finished job was deployed or checkpointed again"
