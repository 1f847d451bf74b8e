"""A ``jobledger coordinator`` process and ``jobledger worker`` processes
running keyed jobs across the network, stopped with SIGTERM and SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobmanager_internal_pb2 as fpb
from tests.helpers.coordinator_process import (
    REPO_ROOT,
    CoordinatorProcess,
    coordinator_command,
    free_port,
)
from tests.test_client_cli import (
    EXIT_FAILED,
    keyed_sum_spec,
    run_cli,
    write_spec,
)
from tests.worker_helpers.jobs import (
    definition,
    expected_sums,
    keyed_sum_graph,
    read_upsert_outputs,
    write_events,
)

# Fast failure detection and frequent checkpoints, so that a job recovers
# within seconds; the restart attempts cover a loaded machine.
COORDINATOR_ARGS = (
    "--checkpoint-interval",
    "0.1",
    "--heartbeat-interval",
    "0.2",
    "--heartbeat-timeout",
    "1.5",
    "--restart-strategy",
    "fixed-delay",
    "--restart-attempts",
    "30",
    "--restart-delay",
    "0.2",
    "--default-slots",
    "4",
)


class WorkerProcess:
    """One ``jobledger worker`` process; its output goes to a log file."""

    def __init__(self, name: str, state_dir: Path, log_path: Path) -> None:
        self.name = name
        self.state_dir = state_dir
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, coordinator: str) -> None:
        command = [
            *coordinator_command(),
            "worker",
            "--coordinator",
            coordinator,
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
        ]
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            )

    async def stop(self, signum: int) -> int:
        """Send ``signum`` and return the exit status; SIGKILL after 20 s."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signum)
        try:
            return await asyncio.wait_for(self.process.wait(), 20)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Network:
    """A coordinator process and the worker processes registered with it."""

    def __init__(self, coordinator: CoordinatorProcess, root: Path) -> None:
        self.coordinator = coordinator
        self.root = root
        self.workers: list[WorkerProcess] = []

    async def add_worker(self, name: str) -> WorkerProcess:
        worker = WorkerProcess(
            name, self.root / "state" / name, self.root / f"{name}.log"
        )
        self.workers.append(worker)
        await worker.start(self.coordinator.address)
        await self.wait_alive(name)
        return worker

    async def wait_alive(self, name: str) -> None:
        async def alive() -> bool:
            reply = await self.coordinator.admin.ListTaskManagers(
                svc.ListTaskManagersRequest()
            )
            return any(
                s.task_manager.task_manager_id == name
                and s.task_manager.status == pb.TASK_MANAGER_ALIVE
                for s in reply.task_managers
            )

        await self.poll(alive, f"worker {name} registered", 30)

    async def submit(self, graph: fpb.JobGraph) -> str:
        reply = await self.coordinator.jm.SubmitJob(
            fpb.SubmitJobRequest(job_graph=graph)
        )
        assert reply.success, reply.message
        return str(reply.job_id)

    async def job(self, job_id: str) -> pb.JobState:
        state: pb.JobState = await self.coordinator.admin.GetJob(
            svc.GetJobRequest(job_id=job_id)
        )
        return state

    async def wait_job(
        self, job_id: str, condition: Callable[[pb.JobState], bool], what: str
    ) -> pb.JobState:
        async def met() -> bool:
            return condition(await self.job(job_id))

        await self.poll(met, what, 60)
        return await self.job(job_id)

    async def poll(
        self, condition: Callable[[], object], what: str, timeout: float
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not await condition():  # type: ignore[misc]
                    await asyncio.sleep(0.05)
        except TimeoutError:
            logs = "\n".join(f"--- {w.name}:\n{w.log()[-3000:]}" for w in self.workers)
            raise AssertionError(
                f"timed out waiting for {what}; coordinator log:\n"
                f"{self.coordinator.log_tail()}\n{logs}"
            ) from None


@contextlib.asynccontextmanager
async def running_network(
    tmp_path: Path, coordinator_args: Sequence[str]
) -> AsyncIterator[Network]:
    """Start a coordinator with ``coordinator_args``; kill every worker at exit."""
    coordinator = CoordinatorProcess(
        tmp_path / "log.db", free_port(), tmp_path, coordinator_args
    )
    await coordinator.start()
    started = Network(coordinator, tmp_path)
    try:
        yield started
    finally:
        for worker in started.workers:
            with contextlib.suppress(TimeoutError):
                await worker.stop(signal.SIGKILL)
        await coordinator.close()


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[Network]:
    async with running_network(tmp_path, COORDINATOR_ARGS) as started:
        yield started


def finished(job: pb.JobState) -> bool:
    assert job.status != pb.JOB_FAILED, job.failure_reason
    return job.status == pb.JOB_FINISHED


def output_bytes(output: Path, parallelism: int) -> list[bytes]:
    return [
        (output.parent / f"{output.name}-{i}").read_bytes() for i in range(parallelism)
    ]


async def test_keyed_job_across_workers(network: Network, tmp_path: Path) -> None:
    for name in ("tm-a", "tm-b"):
        await network.add_worker(name)
    events = write_events(tmp_path / "events.csv", 400)
    graph = keyed_sum_graph(tmp_path / "events.csv", tmp_path / "out")
    job_id = await network.submit(graph)
    job = await network.wait_job(job_id, finished, "the job to finish")
    assert read_upsert_outputs(tmp_path / "out", 2) == expected_sums(events)
    # Subtask 0 of every vertex shares a slot on one worker and subtask 1 on
    # the other, so the HASH edge crossed the network.
    placed = {t.subtask_index: t.task_manager_id for t in job.tasks.values()}
    assert sorted(placed.values()) == ["tm-a", "tm-b"]
    assert all(t.status == pb.TASK_FINISHED for t in job.tasks.values())


async def run_undisturbed(network: Network, tmp_path: Path, rows: int) -> list[bytes]:
    """Run the append job once without failures; return each sink's output."""
    write_events(tmp_path / "events.csv", rows)
    graph = keyed_sum_graph(
        tmp_path / "events.csv",
        tmp_path / "calm",
        delay_ms=3,
        mode="append",
        source_parallelism=1,
    )
    job_id = await network.submit(graph)
    await network.wait_job(job_id, finished, "the undisturbed job to finish")
    return output_bytes(tmp_path / "calm", 2)


def running(job: pb.JobState) -> bool:
    return bool(job.tasks) and all(
        t.status == pb.TASK_RUNNING for t in job.tasks.values()
    )


def checkpointed(job: pb.JobState) -> bool:
    return job.latest_completed_checkpoint_id > 0


@pytest.mark.parametrize(
    ("victim", "moment", "signum"),
    [
        ("source", "checkpointed", signal.SIGKILL),
        ("other", "checkpointed", signal.SIGKILL),
        ("source", "started", signal.SIGKILL),
        ("source", "checkpointed", signal.SIGTERM),
    ],
)
async def test_lost_worker_output_identical_to_undisturbed(
    network: Network, tmp_path: Path, victim: str, moment: str, signum: int
) -> None:
    for name in ("tm-a", "tm-b"):
        await network.add_worker(name)
    expected = await run_undisturbed(network, tmp_path, 600)
    graph = keyed_sum_graph(
        tmp_path / "events.csv",
        tmp_path / "out",
        delay_ms=3,
        mode="append",
        source_parallelism=1,
    )
    job_id = await network.submit(graph)
    condition = checkpointed if moment == "checkpointed" else running
    job = await network.wait_job(job_id, condition, f"the job {moment}")
    source_worker = job.tasks["src_0"].task_manager_id
    killed = next(
        w for w in network.workers if (w.name == source_worker) == (victim == "source")
    )
    # A random moment after that, so that the kill lands in a different
    # phase (staging, commit, send) from run to run.
    await asyncio.sleep(random.uniform(0.0, 0.4))
    expected_status = 0 if signum == signal.SIGTERM else -signum
    assert await killed.stop(signum) == expected_status
    await network.wait_job(job_id, lambda j: j.restarts >= 1, "a restart")
    job = await network.wait_job(job_id, finished, "the recovered job to finish")
    if moment == "checkpointed":
        assert job.restore_checkpoint_id > 0
    assert output_bytes(tmp_path / "out", 2) == expected


def leftovers(state_dir: Path) -> list[Path]:
    """Return temporary files of interrupted atomic writes under ``state_dir``."""
    return sorted(state_dir.rglob(".*.tmp"))


async def test_sigterm_mid_job_stops_cleanly(network: Network, tmp_path: Path) -> None:
    worker = await network.add_worker("tm-a")
    write_events(tmp_path / "events.csv", 3000)
    graph = keyed_sum_graph(
        tmp_path / "events.csv", tmp_path / "out", delay_ms=2, mode="append"
    )
    job_id = await network.submit(graph)
    await network.wait_job(
        job_id,
        lambda j: j.latest_completed_checkpoint_id > 2,
        "three completed checkpoints",
    )
    assert await worker.stop(signal.SIGTERM) == 0, worker.log()
    log = worker.log()
    assert "worker tm-a stopped" in log
    assert "canceled" in log
    assert "Traceback" not in log
    assert leftovers(worker.state_dir) == []
    for snapshot in worker.state_dir.rglob("chk-*.json"):
        json.loads(snapshot.read_bytes())


async def test_bad_operator_config_fails_job(network: Network, tmp_path: Path) -> None:
    await network.add_worker("tm-a")
    graph = keyed_sum_graph(tmp_path / "missing.csv", tmp_path / "out")
    job_id = await network.submit(graph)
    job = await network.wait_job(
        job_id,
        lambda j: j.status == pb.JOB_FAILED or j.restarts >= 1,
        "the failed deployment to reach the job",
    )
    # The worker's reason reached the coordinator through
    # ReportTaskStartupFailure, marked unrecoverable, so the job failed at once.
    assert job.status == pb.JOB_FAILED, job
    assert job.restarts == 0
    assert f"{tmp_path / 'missing.csv'} does not exist" in job.failure_reason
    assert "not recoverable" in job.failure_reason


async def test_unimportable_function_fails_job(
    network: Network, tmp_path: Path
) -> None:
    await network.add_worker("tm-a")
    write_events(tmp_path / "events.csv", 20)
    graph = keyed_sum_graph(tmp_path / "events.csv", tmp_path / "out")
    graph.vertices[1].operator_definition.CopyFrom(
        definition("jobledger.map", function="nomodule:nofunc")
    )
    job_id = await network.submit(graph)
    job = await network.wait_job(
        job_id,
        lambda j: j.status == pb.JOB_FAILED or j.restarts >= 1,
        "the unimportable function to fail the job",
    )
    assert job.status == pb.JOB_FAILED, job
    assert job.restarts == 0
    assert job.failover_attempts == 0
    assert "task sum_" in job.failure_reason
    assert "'nomodule:nofunc': cannot import nomodule" in job.failure_reason
    assert "not recoverable" in job.failure_reason


async def test_submit_unknown_builtin_operator(
    network: Network, tmp_path: Path
) -> None:
    spec = keyed_sum_spec(tmp_path / "events.csv", tmp_path / "out", delay_ms=0)
    spec["vertices"][1]["operator"] = "jobledger.nope"
    path = write_spec(tmp_path / "job.yaml", spec)
    submitted = await run_cli(
        "submit", str(path), "--coordinator", network.coordinator.address
    )
    assert submitted.code == EXIT_FAILED, submitted
    line = submitted.error_line()
    assert "vertex 'sum'" in line
    assert "'jobledger.nope' is not a built-in operator" in line
    assert "jobledger.aggregate" in line
    jobs = await network.coordinator.admin.ListJobs(svc.ListJobsRequest())
    assert list(jobs.jobs) == []


async def test_second_kill_during_recovered_run(
    network: Network, tmp_path: Path
) -> None:
    for name in ("tm-a", "tm-b"):
        await network.add_worker(name)
    expected = await run_undisturbed(network, tmp_path, 800)
    graph = keyed_sum_graph(
        tmp_path / "events.csv",
        tmp_path / "out",
        delay_ms=3,
        mode="append",
        source_parallelism=1,
    )
    job_id = await network.submit(graph)
    for kill in (1, 2):
        job = await network.wait_job(
            job_id,
            lambda j: (
                j.status == pb.JOB_RUNNING
                and j.latest_completed_checkpoint_id > j.restore_checkpoint_id
            ),
            f"a completed checkpoint before kill {kill}",
        )
        source_worker = job.tasks["src_0"].task_manager_id
        killed = next(w for w in network.workers if w.name == source_worker)
        assert await killed.stop(signal.SIGKILL) == -signal.SIGKILL
        # A replacement joins, as an operator restarting a lost host would.
        await network.add_worker(f"tm-replacement-{kill}")
        await network.wait_job(
            job_id, lambda j, k=kill: j.restarts >= k, f"restart {kill}"
        )
    job = await network.wait_job(job_id, finished, "the recovered job to finish")
    assert job.restarts >= 2
    assert output_bytes(tmp_path / "out", 2) == expected
