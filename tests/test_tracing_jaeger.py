"""Checkpoint traces in a real Jaeger, from real coordinator and worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobmanager_internal_pb2 as fpb
from tests.helpers.coordinator_process import REPO_ROOT, CoordinatorProcess, free_port
from tests.helpers.jaeger import Jaeger, jaeger_binary, service_of, tags
from tests.helpers.prometheus import by_name, samples, scrape
from tests.worker_helpers.jobs import keyed_sum_graph, write_events

T = TypeVar("T")

COORDINATOR = "jobledger-coordinator"
TASKS = {"src_0", "src_1", "sum_0", "sum_1", "sink_0", "sink_1"}
ACK_RPC = "/FlinkDotNet.Proto.TaskManagerRegistration/AcknowledgeCheckpoint"


@pytest.fixture
async def jaeger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Jaeger]:
    jaeger_binary()
    server = Jaeger(tmp_path)
    try:
        await server.start()
        # Every process the test starts inherits these and exports here.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", server.otlp_endpoint)
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        yield server
    finally:
        await server.stop()


class Processes:
    """The coordinator and workers of one test, killed at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.workers: list[asyncio.subprocess.Process] = []
        self.coordinator: CoordinatorProcess | None = None

    async def start_coordinator(self, *args: str) -> CoordinatorProcess:
        self.coordinator = CoordinatorProcess(
            self.tmp_path / "log.db", free_port(), self.tmp_path, args
        )
        await self.coordinator.start()
        return self.coordinator

    async def start_worker(self, name: str, *args: str) -> asyncio.subprocess.Process:
        assert self.coordinator is not None
        log = (self.tmp_path / f"{name}.log").open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.worker_helpers.run_worker",
            "--coordinator",
            self.coordinator.address,
            "--slots",
            "4",
            "--state-dir",
            str(self.tmp_path / name),
            "--id",
            name,
            "--heartbeat-interval",
            "0.2",
            *args,
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        self.workers.append(process)
        return process

    async def close(self) -> None:
        for process in self.workers:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                    process.kill()
                await process.wait()
        if self.coordinator is not None:
            await self.coordinator.close()


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[Processes]:
    started = Processes(tmp_path)
    yield started
    await started.close()


async def poll(
    probe: Callable[[], Awaitable[T | None]], what: str, timeout_s: float = 60.0
) -> T:
    """Return the first result of ``probe`` that is not None, or fail."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.2)


async def submit_running(coordinator: CoordinatorProcess, tmp_path: Path) -> str:
    """Submit a keyed sum of 2 x 3 tasks and return its id once all run."""
    write_events(tmp_path / "events.csv", 6000)
    graph = keyed_sum_graph(tmp_path / "events.csv", tmp_path / "out", delay_ms=4)
    reply = await coordinator.jm.SubmitJob(fpb.SubmitJobRequest(job_graph=graph))
    job_id = str(reply.job_id)

    async def running() -> bool | None:
        job = await coordinator.admin.GetJob(svc.GetJobRequest(job_id=job_id))
        statuses = [t.status for t in job.tasks.values()]
        return True if statuses and set(statuses) == {pb.TASK_RUNNING} else None

    await poll(running, f"every task of job {job_id} running")
    return job_id


def checkpoint_traces(traces: list[dict[str, Any]], cid: int) -> list[dict[str, Any]]:
    """Return the traces whose root is the trigger span of checkpoint ``cid``."""
    return [
        trace
        for trace in traces
        if any(
            span["operationName"] == "checkpoint.trigger"
            and tags(span).get("jobledger.checkpoint.id") == cid
            for span in trace["spans"]
        )
    ]


def spans_named(trace: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [span for span in trace["spans"] if span["operationName"] == name]


def is_complete(trace: dict[str, Any], cid: int) -> bool:
    """Whether the trace contains every span of a completed checkpoint ``cid``."""
    snapshots = {
        tags(s)["jobledger.task.id"]
        for s in spans_named(trace, "checkpoint.snapshot")
        if tags(s).get("jobledger.checkpoint.id") == cid
    }
    acks = {
        tags(s).get("jobledger.task.id")
        for s in spans_named(trace, ACK_RPC)
        if service_of(trace, s) == COORDINATOR
    }
    completed = spans_named(trace, "checkpoint.completed")
    return snapshots == TASKS and acks == TASKS and len(completed) == 1


async def test_each_completed_checkpoint_is_one_trace(
    jaeger: Jaeger, processes: Processes, tmp_path: Path
) -> None:
    metrics_port = free_port()
    coordinator = await processes.start_coordinator(
        "--checkpoint-interval",
        "0.5",
        "--heartbeat-interval",
        "0.2",
        "--metrics-port",
        str(metrics_port),
    )
    worker_metrics_ports = [free_port(), free_port()]
    for name, port in zip(("tm-a", "tm-b"), worker_metrics_ports, strict=True):
        await processes.start_worker(name, "--metrics-port", str(port))
    job_id = await submit_running(coordinator, tmp_path)

    async def completed() -> list[int] | None:
        listing = await coordinator.admin.ListCheckpoints(
            svc.ListCheckpointsRequest(job_id=job_id)
        )
        done = [
            c.checkpoint_id
            for c in listing.checkpoints
            if c.status in (pb.CHECKPOINT_COMPLETED, pb.CHECKPOINT_DISCARDED)
        ]
        return done if len(done) >= 3 else None

    checkpoint_ids = await poll(completed, "three completed checkpoints")
    # Scraped while the job runs; its tasks may all run on one of the workers.
    records_in = {
        series: value
        for port in worker_metrics_ports
        for series, value in samples(await scrape(port)).items()
        if series.startswith("jobledger_task_records_in")
    }
    assert len(records_in) == len(TASKS), records_in
    assert all(value > 0 for value in records_in.values())

    async def all_traced() -> list[dict[str, Any]] | None:
        traces = await jaeger.traces(COORDINATOR)
        for cid in checkpoint_ids:
            found = checkpoint_traces(traces, cid)
            if len(found) != 1 or not is_complete(found[0], cid):
                return None
        return traces

    traces = await poll(all_traced, f"complete traces of {checkpoint_ids}")
    for cid in checkpoint_ids:
        (trace,) = checkpoint_traces(traces, cid)
        (trigger,) = spans_named(trace, "checkpoint.trigger")
        assert trigger["references"] == []
        assert tags(trigger)["jobledger.checkpoint.tasks_to_acknowledge"] == len(TASKS)
        assert {service_of(trace, s) for s in trace["spans"]} == {
            COORDINATOR,
            "jobledger-worker",
        }
        aligned = {
            tags(s)["jobledger.task.id"] for s in spans_named(trace, "checkpoint.align")
        }
        assert aligned == TASKS - {"src_0", "src_1"}
        for span in spans_named(trace, "checkpoint.snapshot"):
            assert tags(span)["jobledger.snapshot.size"] > 0

    # Log lines written inside a span name its trace.
    log = coordinator.log_tail(lines=10_000)
    trace_ids = {trace["traceID"].zfill(32) for trace in traces}
    logged = {line.partition("trace_id=")[2][:32] for line in log.splitlines()}
    assert trace_ids & logged

    coordinator_metrics = by_name(await scrape(metrics_port))
    completed = coordinator_metrics["jobledger_checkpoints_completed_total"]
    assert completed >= len(checkpoint_ids)
    assert (
        coordinator_metrics["jobledger_checkpoint_duration_seconds_count"] == completed
    )
    assert coordinator_metrics["jobledger_checkpoint_size_bytes_sum"] > 0


async def test_restarted_coordinator_ends_checkpoint_in_its_trace(
    jaeger: Jaeger, processes: Processes, tmp_path: Path
) -> None:
    metrics_port = free_port()
    coordinator = await processes.start_coordinator(
        "--heartbeat-interval",
        "0.2",
        "--heartbeat-timeout",
        "60",
        "--metrics-port",
        str(metrics_port),
    )
    worker = await processes.start_worker("tm-a")
    job_id = await submit_running(coordinator, tmp_path)

    # A stopped worker cannot take the trigger, so the checkpoint stays
    # pending until the coordinator is killed.
    worker.send_signal(signal.SIGSTOP)
    reply = await coordinator.jm.RequestCheckpoint(
        fpb.RequestCheckpointRequest(job_id=job_id)
    )
    (cid,) = reply.checkpoint_ids

    async def triggered() -> dict[str, Any] | None:
        found = checkpoint_traces(await jaeger.traces(COORDINATOR), cid)
        return found[0] if found else None

    await poll(triggered, f"the trigger span of checkpoint {cid}")
    assert await coordinator.kill() == -signal.SIGKILL
    await coordinator.start()
    worker.send_signal(signal.SIGCONT)

    async def ended() -> dict[str, Any] | None:
        found = checkpoint_traces(await jaeger.traces(COORDINATOR), cid)
        if len(found) == 1 and spans_named(found[0], "checkpoint.failed"):
            return found[0]
        return None

    trace = await poll(ended, f"the end of checkpoint {cid} in its trace")
    (trigger,) = spans_named(trace, "checkpoint.trigger")
    (end,) = spans_named(trace, "checkpoint.failed")
    assert end["references"][0]["spanID"] == trigger["spanID"]
    assert tags(end)["jobledger.checkpoint.failure"] == "CHECKPOINT_ABORTED"
    assert tags(end)["jobledger.checkpoint.failure_message"] == "the leader changed"
    # The end was recorded by the restarted coordinator, at the next epoch.
    assert tags(trigger)["jobledger.leader.epoch"] == 1
    assert tags(end)["jobledger.leader.epoch"] == 2
    aborted = [
        value
        for series, value in samples(await scrape(metrics_port)).items()
        if series.startswith("jobledger_checkpoints_failed_total{")
        and f'jobledger_job_id="{job_id}"' in series
        and 'reason="CHECKPOINT_ABORTED"' in series
    ]
    assert aborted == [1.0]


async def test_failover_and_redeployment_share_trace(
    jaeger: Jaeger, processes: Processes, tmp_path: Path
) -> None:
    metrics_port = free_port()
    coordinator = await processes.start_coordinator(
        "--metrics-port",
        str(metrics_port),
        "--heartbeat-interval",
        "0.2",
        "--heartbeat-timeout",
        "1.5",
        "--restart-strategy",
        "fixed-delay",
        "--restart-delay",
        "0.2",
        "--restart-attempts",
        "5",
    )
    workers = {name: await processes.start_worker(name) for name in ("tm-a", "tm-b")}
    job_id = await submit_running(coordinator, tmp_path)
    job = await coordinator.admin.GetJob(svc.GetJobRequest(job_id=job_id))
    lost = job.tasks["src_0"].task_manager_id
    workers[lost].kill()
    await workers[lost].wait()

    async def recovered() -> dict[str, Any] | None:
        for trace in await jaeger.traces(COORDINATOR):
            failovers = spans_named(trace, "job.failover")
            deployed = {
                tags(s)["jobledger.task.id"] for s in spans_named(trace, "task.deploy")
            }
            # The workers export their spans on their own schedule, so the
            # trace is complete only once their DeployTask spans are in too.
            complete = len(worker_deploy_calls(trace)) >= len(TASKS)
            restarted = bool(failovers and spans_named(trace, "job.restart"))
            if restarted and deployed == TASKS and complete:
                return trace
        return None

    def worker_deploy_calls(trace: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            s
            for s in spans_named(trace, "/FlinkDotNet.Proto.TaskExecution/DeployTask")
            if service_of(trace, s) == "jobledger-worker"
        ]

    trace = await poll(recovered, f"the recovery trace of job {job_id}")
    (failover,) = spans_named(trace, "job.failover")
    assert tags(failover)["jobledger.job.id"] == job_id
    assert failover["references"] == []
    (restart,) = spans_named(trace, "job.restart")
    assert restart["references"][0]["spanID"] == failover["spanID"]
    assert len(worker_deploy_calls(trace)) == len(TASKS)
    failovers = by_name(await scrape(metrics_port))["jobledger_job_failovers_total"]
    assert failovers >= 1
