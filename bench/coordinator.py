"""Measure the coordinator's RPC throughput and its restart time.

Run ``python -m bench.coordinator``, or add ``--quick`` for small sizes.
Every coordinator is a ``jobledger coordinator`` subprocess on 127.0.0.1,
and every worker it calls is a small gRPC server in this process.

- Throughput: two coordinators run side by side, one on a durable SQLite
  log and one on an in-memory log (``--db :memory:``). Client processes,
  each with many concurrent grpc.aio calls, send SendHeartbeat for the
  registered task managers for a fixed time, then AcknowledgeCheckpoint
  for every task of a running job with many tasks and several pending
  checkpoints. Each acknowledgement is one RPC. The two coordinators take
  turns, so drift on the machine affects both alike.
- Restart: a log of 1,000,000 events (one task manager registration, then
  heartbeats of it) is written directly through SqliteEventLog. The time
  from spawning a coordinator on it until GetOverview succeeds, which only
  a leader serves, is measured without a snapshot, then again after a
  snapshot of the replayed state was saved.
- Tracing: AcknowledgeCheckpoint as above against coordinators with
  tracing off, on (every span exported over OTLP to a real Jaeger,
  ``tools/bin/jaeger``), on with each acknowledgement carrying a W3C
  traceparent as a traced worker's does, and on with the acknowledgements'
  service left out of tracing. ``--tracing-only`` runs this case alone.

Each figure is the median of a few repetitions. The last line of the output
is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import multiprocessing.queues
import multiprocessing.synchronize
import os
import platform
import queue as queue_module
import random
import re
import signal
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.eventlog import cpu_count, filesystem_type
from bench.jaeger import JAEGER, Jaeger
from coordinator.replay import replay
from eventlog import SqliteEventLog
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc
from worker.cli import run_event_loop

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIENT_PROCESSES = 2
CALLS_IN_FLIGHT = 64
WORKERS = 4
INCARNATION = 1
LOGS = ("sqlite", "memory")

# Events per append while the restart log is written: SqliteEventLog's
# default max_batch_events, so each append is one commit.
_FILL_BATCH = 4096

_REPLAYED = re.compile(
    r"replayed (?P<events>\d+) events after snapshot seq (?P<seq>\d+) "
    r"in (?P<ms>\d+) ms"
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and durations of one benchmark run."""

    quick: bool
    repetitions: int
    heartbeat_s: float
    # Subtasks per vertex of the three-vertex job that acknowledges.
    parallelism: int
    # Checkpoints pending at once in each acknowledgement run.
    checkpoints: int
    restart_events: int
    # Runs of each tracing case. Tracing costs a few per cent, about as much
    # as the rate moves from run to run here, so its medians need more runs.
    tracing_repetitions: int


FULL = Settings(
    quick=False,
    repetitions=3,
    heartbeat_s=3.0,
    parallelism=128,
    checkpoints=16,
    restart_events=1_000_000,
    tracing_repetitions=7,
)
QUICK = Settings(
    quick=True,
    repetitions=3,
    heartbeat_s=0.8,
    parallelism=32,
    checkpoints=12,
    restart_events=100_000,
    tracing_repetitions=3,
)


# ------------------------------------------------------------ processes


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that no socket is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def coordinator_command() -> list[str]:
    """Return the command of the ``jobledger`` console script of this Python."""
    script = Path(sys.executable).with_name("jobledger")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "coordinator.cli"]


# gRPC waits 1 s before its first reconnection attempt by default, which
# would dominate a start that takes well under a second.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 100),
)


class CoordinatorProcess:
    """A ``jobledger coordinator`` subprocess and a channel to it."""

    def __init__(
        self,
        db: str,
        log_path: Path,
        options: Sequence[str],
        environ: dict[str, str] | None = None,
    ) -> None:
        self.db = db
        # Added to this process's environment, e.g. OTEL_* variables.
        self.environ = environ or {}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.options = list(options)
        self.process: asyncio.subprocess.Process | None = None
        self.channel: grpc.aio.Channel | None = None
        self.jm: Any = None
        self.tm: Any = None
        self.admin: Any = None

    async def start(self, timeout_s: float = 120.0) -> float:
        """Spawn the process and return the seconds until GetOverview succeeded."""
        command = [
            *coordinator_command(),
            "coordinator",
            "--db",
            self.db,
            "--listen",
            self.address,
            *self.options,
        ]
        self.channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
        self.jm = fpb_grpc.JobManagerInternalServiceStub(self.channel)
        self.tm = fpb_grpc.TaskManagerRegistrationStub(self.channel)
        self.admin = svc_grpc.AdminServiceStub(self.channel)
        started = time.perf_counter()
        with self.log_path.open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                cwd=REPO_ROOT,
                env={**os.environ, **self.environ},
            )
        await self._wait_leader(started + timeout_s)
        return time.perf_counter() - started

    async def _wait_leader(self, deadline: float) -> None:
        # A standby, and a leader still replaying the log, return UNAVAILABLE.
        while True:
            assert self.process is not None
            if self.process.returncode is not None:
                raise RuntimeError(
                    f"the coordinator on {self.address} exited with status "
                    f"{self.process.returncode}; see {self.log_path}"
                )
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError(
                    f"the coordinator on {self.address} did not lead in time; "
                    f"see {self.log_path}"
                )
            try:
                await self.admin.GetOverview(
                    svc.GetOverviewRequest(),
                    timeout=min(remaining, 5.0),
                    wait_for_ready=True,
                )
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
            await asyncio.sleep(0.005)

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"the coordinator on {self.address} was never started")
        return self.process.pid

    async def stop(self) -> None:
        """Stop the process with SIGTERM, or SIGKILL after 20 s. Safe to call twice."""
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 20.0)
        except TimeoutError:
            process.kill()
            await process.wait()

    def last_replay(self) -> tuple[int, int]:
        """Return (events, milliseconds) of the newest replay line in the log."""
        matches = list(_REPLAYED.finditer(self.log_path.read_text(errors="replace")))
        if not matches:
            raise RuntimeError(f"no replay line in {self.log_path}")
        last = matches[-1]
        return int(last["events"]), int(last["ms"])


def cpu_seconds(pid: int) -> float | None:
    """Return the user and system CPU seconds of a process so far.

    Reads /proc/PID/stat, so it returns None outside Linux.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in brackets may contain spaces. The fields after it
    # are separated by spaces, and utime and stime are the 12th and 13th.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------ workers


class BenchWorker(
    fpb_grpc.TaskExecutionServicer,
    fpb_grpc.TaskManagerCheckpointingServicer,
    svc_grpc.TaskManagerControlServicer,
):
    """A worker that accepts every call of the coordinator and counts them."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.port = 0
        self._server: Any = None

    async def start(self) -> int:
        server = grpc.aio.server()
        fpb_grpc.add_TaskExecutionServicer_to_server(self, server)
        fpb_grpc.add_TaskManagerCheckpointingServicer_to_server(self, server)
        svc_grpc.add_TaskManagerControlServicer_to_server(self, server)
        self.port = int(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        self._server = server
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    def _count(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1

    async def DeployTask(
        self, request: fpb.TaskDeploymentDescriptor, context: Any
    ) -> fpb.DeployTaskResponse:
        self._count("DeployTask")
        return fpb.DeployTaskResponse(success=True)

    async def TriggerTaskCheckpoint(
        self, request: fpb.TriggerCheckpointRequest, context: Any
    ) -> fpb.TriggerCheckpointResponse:
        self._count("TriggerTaskCheckpoint")
        return fpb.TriggerCheckpointResponse(acknowledged=True)

    async def NotifyCheckpointComplete(
        self, request: svc.NotifyCheckpointCompleteRequest, context: Any
    ) -> svc.NotifyCheckpointCompleteResponse:
        self._count("NotifyCheckpointComplete")
        return svc.NotifyCheckpointCompleteResponse()

    async def NotifyCheckpointAborted(
        self, request: svc.NotifyCheckpointAbortedRequest, context: Any
    ) -> svc.NotifyCheckpointAbortedResponse:
        self._count("NotifyCheckpointAborted")
        return svc.NotifyCheckpointAbortedResponse()

    async def CancelTask(
        self, request: svc.CancelTaskRequest, context: Any
    ) -> svc.CancelTaskResponse:
        self._count("CancelTask")
        return svc.CancelTaskResponse(canceled=True)

    async def DiscardSnapshots(
        self, request: svc.DiscardSnapshotsRequest, context: Any
    ) -> svc.DiscardSnapshotsResponse:
        self._count("DiscardSnapshots")
        return svc.DiscardSnapshotsResponse(discarded=len(request.snapshot_handles))


# ------------------------------------------------------------ clients


@dataclasses.dataclass(frozen=True)
class AckItem:
    """One task's acknowledgement of one checkpoint."""

    job_id: str
    checkpoint_id: int
    task_manager_id: str
    job_vertex_id: str
    subtask_index: int


@dataclasses.dataclass(frozen=True)
class ClientSpec:
    """The RPCs of one client process: heartbeats for a fixed time, or
    acknowledgements."""

    address: str
    calls_in_flight: int
    heartbeat_s: float = 0.0
    task_managers: tuple[str, ...] = ()
    acks: tuple[AckItem, ...] = ()
    # Send each acknowledgement with a W3C traceparent of its own, as a
    # traced worker sends it from its snapshot span.
    trace_context: bool = False


@dataclasses.dataclass(frozen=True)
class ClientResult:
    """The calls one client process made, with its start and end on the
    system-wide monotonic clock."""

    accepted: int
    rejected: int
    failed: int
    started: float
    finished: float
    # CPU seconds of the whole client process between started and finished.
    cpu_s: float
    first_error: str


def run_client(
    spec: ClientSpec,
    ready: multiprocessing.queues.Queue[int],
    go: multiprocessing.synchronize.Event,
    results: multiprocessing.queues.Queue[ClientResult],
) -> None:
    """Run in a client process: connect, report ready, wait for ``go``, send."""
    results.put(run_event_loop(_client(spec, ready, go)))


async def _client(
    spec: ClientSpec,
    ready: multiprocessing.queues.Queue[int],
    go: multiprocessing.synchronize.Event,
) -> ClientResult:
    async with grpc.aio.insecure_channel(spec.address) as channel:
        stub = fpb_grpc.TaskManagerRegistrationStub(channel)
        admin = svc_grpc.AdminServiceStub(channel)
        await admin.GetOverview(svc.GetOverviewRequest(), timeout=30)
        ready.put(os.getpid())
        if not await asyncio.to_thread(go.wait, 120.0):
            raise TimeoutError("the benchmark never started the clients")
        counts = _Counts()
        cpu_started = time.process_time()
        started = time.monotonic()
        if spec.acks:
            items = iter(spec.acks)
            senders = [
                _send_acks(stub, items, counts, spec.trace_context)
                for _ in range(spec.calls_in_flight)
            ]
        else:
            deadline = started + spec.heartbeat_s
            senders = [
                _send_heartbeats(stub, spec.task_managers, i, deadline, counts)
                for i in range(spec.calls_in_flight)
            ]
        await asyncio.gather(*senders)
        finished = time.monotonic()
        cpu_s = time.process_time() - cpu_started
    return ClientResult(
        counts.accepted,
        counts.rejected,
        counts.failed,
        started,
        finished,
        cpu_s,
        counts.first_error,
    )


@dataclasses.dataclass
class _Counts:
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    first_error: str = ""

    def fail(self, exc: grpc.aio.AioRpcError) -> None:
        self.failed += 1
        if not self.first_error:
            self.first_error = f"{exc.code().name}: {exc.details()}"


async def _send_heartbeats(
    stub: Any,
    task_managers: Sequence[str],
    first: int,
    deadline: float,
    counts: _Counts,
) -> None:
    index = first
    while time.monotonic() < deadline:
        request = fpb.HeartbeatRequest(
            task_manager_id=task_managers[index % len(task_managers)],
            incarnation=INCARNATION,
        )
        index += 1
        try:
            reply: fpb.HeartbeatResponse = await stub.SendHeartbeat(request)
        except grpc.aio.AioRpcError as exc:
            counts.fail(exc)
            continue
        if reply.acknowledged:
            counts.accepted += 1
        else:
            counts.rejected += 1


async def _send_acks(
    stub: Any, items: Iterator[AckItem], counts: _Counts, trace_context: bool
) -> None:
    # The senders share one iterator, so acknowledgements go out in the
    # order of the items: checkpoint by checkpoint, oldest first.
    metadata: tuple[tuple[str, str], ...] = ()
    for item in items:
        if trace_context:
            trace_id = random.getrandbits(128) or 1
            span_id = random.getrandbits(64) or 1
            metadata = (("traceparent", f"00-{trace_id:032x}-{span_id:016x}-01"),)
        tid = f"{item.job_vertex_id}_{item.subtask_index}"
        request = fpb.AcknowledgeCheckpointRequest(
            job_id=item.job_id,
            checkpoint_id=item.checkpoint_id,
            task_manager_id=item.task_manager_id,
            job_vertex_id=item.job_vertex_id,
            subtask_index=item.subtask_index,
            snapshot_handle=f"bench/{item.checkpoint_id}/{tid}",
            source_offsets={"partition-0": item.checkpoint_id},
            snapshot_size=4096,
            duration=1,
        )
        try:
            reply: fpb.AcknowledgeCheckpointResponse = await stub.AcknowledgeCheckpoint(
                request, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            counts.fail(exc)
            continue
        if reply.success:
            counts.accepted += 1
        else:
            counts.rejected += 1


@dataclasses.dataclass(frozen=True)
class Run:
    """One timed run of all client processes together."""

    rpcs: int
    accepted: int
    rejected: int
    failed: int
    seconds: float
    first_error: str
    # CPU cores the coordinator kept busy from the start signal to the last
    # result, or None where that cannot be read.
    coordinator_cores: float | None
    # CPU cores the client processes kept busy together while they sent.
    client_cores: float

    @property
    def rate(self) -> float:
        return self.rpcs / self.seconds


async def run_clients(
    context: multiprocessing.context.SpawnContext,
    specs: Sequence[ClientSpec],
    coordinator_pid: int,
) -> Run:
    """Start one process per spec, start them together and collect the counts."""
    ready: multiprocessing.queues.Queue[int] = context.Queue()
    results: multiprocessing.queues.Queue[ClientResult] = context.Queue()
    go = context.Event()
    processes = [
        context.Process(target=run_client, args=(spec, ready, go, results))
        for spec in specs
    ]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            await _next_from(ready, processes, 60.0)
        cpu_before = cpu_seconds(coordinator_pid)
        wall_before = time.monotonic()
        go.set()
        outcomes = [await _next_from(results, processes, 300.0) for _ in processes]
        cpu_after = cpu_seconds(coordinator_pid)
        wall = time.monotonic() - wall_before
    finally:
        for process in processes:
            await asyncio.to_thread(process.join, 30.0)
            if process.is_alive():
                process.kill()

    cores = None
    if cpu_before is not None and cpu_after is not None:
        cores = (cpu_after - cpu_before) / wall
    return _combine(outcomes, cores)


async def _next_from(
    queue: multiprocessing.queues.Queue[Any],
    processes: Sequence[multiprocessing.process.BaseProcess],
    timeout_s: float,
) -> Any:
    """Return the next item of ``queue``; raise if a client process died first."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(queue_module.Empty):
            return await asyncio.to_thread(queue.get, True, 0.5)
        dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"a client process exited with status {dead[0]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no client process reported within {timeout_s} s")


def _combine(outcomes: Sequence[ClientResult], coordinator_cores: float | None) -> Run:
    accepted = sum(o.accepted for o in outcomes)
    rejected = sum(o.rejected for o in outcomes)
    failed = sum(o.failed for o in outcomes)
    seconds = max(o.finished for o in outcomes) - min(o.started for o in outcomes)
    errors = [o.first_error for o in outcomes if o.first_error]
    return Run(
        rpcs=accepted + rejected + failed,
        accepted=accepted,
        rejected=rejected,
        failed=failed,
        seconds=seconds,
        first_error=errors[0] if errors else "",
        coordinator_cores=coordinator_cores,
        client_cores=sum(o.cpu_s for o in outcomes) / seconds,
    )


# ------------------------------------------------------------ throughput


def job_graph(parallelism: int) -> fpb.JobGraph:
    """Build source -> map -> sink, FORWARD then HASH, each of ``parallelism``."""
    vertices = [
        ("src", fpb.SOURCE, (), ("e1",)),
        ("map", fpb.OPERATOR, ("e1",), ("e2",)),
        ("sink", fpb.SINK, ("e2",), ()),
    ]
    return fpb.JobGraph(
        job_name="bench",
        vertices=[
            fpb.JobVertex(
                id=vid,
                name=vid,
                parallelism=parallelism,
                vertex_type=kind,
                operator_definition=fpb.OperatorDefinition(
                    fully_qualified_name=f"bench.{vid}"
                ),
                input_edge_ids=inputs,
                output_edge_ids=outputs,
            )
            for vid, kind, inputs, outputs in vertices
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


@dataclasses.dataclass
class Target:
    """A coordinator with registered workers and one running job."""

    log: str
    coordinator: CoordinatorProcess
    task_managers: list[str]
    job_id: str
    tasks: list[pb.TaskState]


def throughput_options(settings: Settings) -> list[str]:
    slots = -(-settings.parallelism // WORKERS)
    return [
        "--default-slots",
        str(slots),
        "--max-parallelism",
        str(max(128, settings.parallelism)),
        "--max-concurrent-checkpoints",
        str(settings.checkpoints * 4),
        # The workers send no heartbeats while acknowledgements are measured.
        "--heartbeat-interval",
        "60",
        "--heartbeat-timeout",
        "3600",
    ]


async def start_target(
    log: str,
    folder: Path,
    settings: Settings,
    worker: BenchWorker,
    environ: dict[str, str] | None = None,
    name: str = "",
) -> Target:
    """Start a coordinator on a ``log`` ("sqlite" or "memory") with a job.

    ``name`` tells apart the files of two targets on the same kind of log.
    """
    name = name or log
    db = ":memory:" if log == "memory" else str(folder / f"throughput-{name}.db")
    coordinator = CoordinatorProcess(
        db, folder / f"coordinator-{name}.log", throughput_options(settings), environ
    )
    await coordinator.start()
    task_managers = [f"tm-{i + 1}" for i in range(WORKERS)]
    for tm_id in task_managers:
        # Every task manager is the one BenchWorker: slots 0 selects
        # --default-slots.
        await coordinator.tm.RegisterTaskManager(
            fpb.RegisterTaskManagerRequest(
                task_manager_id=tm_id,
                address="127.0.0.1",
                port=worker.port,
                slots=0,
                incarnation=INCARNATION,
            )
        )
    submitted: fpb.SubmitJobReply = await coordinator.jm.SubmitJob(
        fpb.SubmitJobRequest(job_graph=job_graph(settings.parallelism))
    )
    job = await wait_running(coordinator, submitted.job_id)
    return Target(
        log, coordinator, task_managers, submitted.job_id, list(job.tasks.values())
    )


async def wait_running(
    coordinator: CoordinatorProcess, job_id: str, timeout_s: float = 60.0
) -> pb.JobState:
    deadline = time.monotonic() + timeout_s
    while True:
        job: pb.JobState = await coordinator.admin.GetJob(
            svc.GetJobRequest(job_id=job_id)
        )
        if job.status == pb.JOB_RUNNING and all(
            task.status == pb.TASK_RUNNING for task in job.tasks.values()
        ):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not running after {timeout_s} s")
        await asyncio.sleep(0.05)


async def measure_heartbeats(
    context: multiprocessing.context.SpawnContext, target: Target, settings: Settings
) -> Run:
    spec = ClientSpec(
        address=target.coordinator.address,
        calls_in_flight=CALLS_IN_FLIGHT,
        heartbeat_s=settings.heartbeat_s,
        task_managers=tuple(target.task_managers),
    )
    return await run_clients(context, [spec] * CLIENT_PROCESSES, target.coordinator.pid)


async def trigger_checkpoints(target: Target, count: int) -> list[int]:
    ids: list[int] = []
    for _ in range(count):
        reply: fpb.RequestCheckpointReply = (
            await target.coordinator.jm.RequestCheckpoint(
                fpb.RequestCheckpointRequest(job_id=target.job_id)
            )
        )
        ids.extend(reply.checkpoint_ids)
    if len(ids) != count:
        raise RuntimeError(f"{count} checkpoints requested, {len(ids)} triggered")
    return ids


async def wait_completed(target: Target, checkpoint_id: int) -> None:
    deadline = time.monotonic() + 30.0
    while True:
        job: pb.JobState = await target.coordinator.admin.GetJob(
            svc.GetJobRequest(job_id=target.job_id)
        )
        if job.latest_completed_checkpoint_id >= checkpoint_id:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"checkpoint {checkpoint_id} of job {target.job_id} on the "
                f"{target.log} log did not complete"
            )
        await asyncio.sleep(0.05)


async def measure_acks(
    context: multiprocessing.context.SpawnContext,
    target: Target,
    settings: Settings,
    trace_context: bool = False,
) -> Run:
    """Trigger checkpoints, then acknowledge each for every task of the job.

    Client process k sends the acknowledgements of the tasks whose position
    in the sorted task list is k modulo the number of processes.
    """
    ids = await trigger_checkpoints(target, settings.checkpoints)
    tasks = sorted(target.tasks, key=lambda t: (t.job_vertex_id, t.subtask_index))
    specs = []
    for k in range(CLIENT_PROCESSES):
        mine = tasks[k::CLIENT_PROCESSES]
        acks = tuple(
            AckItem(
                target.job_id,
                cid,
                task.task_manager_id,
                task.job_vertex_id,
                task.subtask_index,
            )
            for cid in ids
            for task in mine
        )
        specs.append(
            ClientSpec(
                address=target.coordinator.address,
                calls_in_flight=CALLS_IN_FLIGHT,
                acks=acks,
                trace_context=trace_context,
            )
        )
    run = await run_clients(context, specs, target.coordinator.pid)
    await wait_completed(target, max(ids))
    return run


# ------------------------------------------------------------ tracing


def _cpu_per_rpc_us(runs: Sequence[Run]) -> float | None:
    """Return the median coordinator CPU time per RPC in µs, if it was read.

    Less sensitive than the rate to other processes taking the CPU.
    """
    values = [
        r.coordinator_cores * r.seconds / r.rpcs * 1e6
        for r in runs
        if r.coordinator_cores is not None
    ]
    return round(_median(values)) if values else None


def tracing_environ(jaeger: Jaeger) -> dict[str, str]:
    """Return the environment that sends a coordinator's spans to ``jaeger``."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_endpoint,
        "OTEL_METRICS_EXPORTER": "none",
        # A queue that holds every span of a run, so none is dropped, and
        # exports every 0.2 s rather than 5 s, so that spans are exported
        # while the run they belong to is measured.
        "OTEL_BSP_MAX_QUEUE_SIZE": "262144",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }


# The tracing cases, with the keys of their figures. In the traceparent
# cases each acknowledgement carries a traceparent, as a traced worker's
# does, and they run against the coordinators of "off" and "on": the header
# costs gRPC some work even where the coordinator does not trace. The last
# case leaves the acknowledgements' service out, as
# OTEL_PYTHON_GRPC_EXCLUDED_SERVICES allows.
TRACING_CASES = {
    "off": "off",
    "off, acknowledgements with a traceparent": "off_traceparent",
    "on": "on",
    "on, acknowledgements with a traceparent": "on_traceparent",
    "on, TaskManagerRegistration untraced": "on_acks_untraced",
}
_WITH_TRACEPARENT = (
    "off, acknowledgements with a traceparent",
    "on, acknowledgements with a traceparent",
)
_REGISTRATION = "FlinkDotNet.Proto.TaskManagerRegistration"


async def _traced_targets(
    jaeger: Jaeger, folder: Path, settings: Settings, worker: BenchWorker
) -> list[Target]:
    """Start the coordinators of the two traced cases, on their own logs."""
    untraced_acks = {
        **tracing_environ(jaeger),
        "OTEL_PYTHON_GRPC_EXCLUDED_SERVICES": _REGISTRATION,
    }
    environs = [tracing_environ(jaeger), untraced_acks]
    return [
        await start_target("sqlite", folder, settings, worker, environ, f"traced-{n}")
        for n, environ in enumerate(environs)
    ]


async def measure_tracing(
    context: multiprocessing.context.SpawnContext,
    settings: Settings,
    folder: Path,
    worker: BenchWorker,
    untraced: Target,
) -> dict[str, Any]:
    """Measure AcknowledgeCheckpoint with tracing off and on, taking turns.

    ``untraced`` is a coordinator on a SQLite log without tracing; two more,
    each on its own SQLite log, export their spans over OTLP to a real
    Jaeger. Returns no figures when ``tools/bin/jaeger`` is missing.
    """
    if not JAEGER.exists():
        print(f"tracing: skipped, {JAEGER} is missing (build it with `make jaeger`)")
        return {}
    jaeger = Jaeger(folder)
    await jaeger.start()
    traced: list[Target] = []
    runs: dict[str, list[Run]] = {case: [] for case in TRACING_CASES}
    try:
        traced = await _traced_targets(jaeger, folder, settings, worker)
        coordinators = [untraced, untraced, traced[0], traced[0], traced[1]]
        targets = dict(zip(TRACING_CASES, coordinators, strict=True))
        # One run of each case first, not counted: a coordinator's first
        # runs are slower, and the untraced one of a full run is warm
        # already from the cases before.
        for case, target in targets.items():
            await measure_acks(context, target, settings, case in _WITH_TRACEPARENT)
        for _ in range(settings.tracing_repetitions):
            for case, target in targets.items():
                run = await measure_acks(
                    context, target, settings, case in _WITH_TRACEPARENT
                )
                runs[case].append(run)
        # Wait for the last export, then count the checkpoint traces.
        await asyncio.sleep(1.0)
        traces = await jaeger.trace_count("jobledger-coordinator", "checkpoint.trigger")
    finally:
        for target in traced:
            await target.coordinator.stop()
        await jaeger.stop()
    return _tracing_figures(runs, traces)


def _tracing_figures(runs: dict[str, list[Run]], traces: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"tracing_checkpoint_traces": traces}
    off = _median([r.rate for r in runs["off"]])
    for case, key in TRACING_CASES.items():
        _print_runs(f"AcknowledgeCheckpoint, tracing {case}", runs[case])
        rate = _median([r.rate for r in runs[case]])
        cpu = _cpu_per_rpc_us(runs[case])
        figures[f"ack_tracing_{key}_rpcs_per_s"] = round(rate)
        figures[f"ack_tracing_{key}_coordinator_cpu_us_per_rpc"] = cpu
        figures[f"ratio_ack_tracing_{key}_to_off"] = round(rate / off, 3)
        print(
            f"  tracing {case}: {rate / off:.3f} of the rate with tracing off; "
            f"coordinator CPU {cpu} µs per RPC (median of the runs)"
        )
    with_header = _median([r.rate for r in runs[_WITH_TRACEPARENT[1]]])
    without = _median([r.rate for r in runs[_WITH_TRACEPARENT[0]]])
    figures["ratio_ack_tracing_on_traceparent_to_off_traceparent"] = round(
        with_header / without, 3
    )
    print(
        f"  with a traceparent on every acknowledgement, tracing on: "
        f"{with_header / without:.3f} of the rate with tracing off"
    )
    print(
        f"target: tracing on at 0.9 or more of off; Jaeger stored {traces} "
        "checkpoint traces"
    )
    return figures


# ------------------------------------------------------------ restart


def heartbeat_event(task_manager_id: str, registration_id: int) -> pb.Event:
    event = pb.Event()
    heartbeat = event.task_manager_heartbeat
    heartbeat.task_manager_id = task_manager_id
    heartbeat.registration_id = registration_id
    metric = heartbeat.task_metrics.add()
    metric.task_id = "map_3"
    metric.records_in = 1_234_567
    metric.records_out = 1_234_000
    metric.job_id = "no-such-job"
    return event


async def build_restart_log(path: Path, events: int, worker_port: int) -> float:
    """Write a log of ``events`` events and return the seconds it took.

    Seq 1 is the builder's LeaderElected event, and seq 2 registers task
    manager tm-1 at the benchmark's own worker. Every later event is a
    heartbeat of tm-1. The lease is released at the end, so a coordinator takes it at
    once.
    """
    started = time.perf_counter()
    async with SqliteEventLog(path) as log:
        lease = await log.acquire_lease("bench-builder", "127.0.0.1:0", 3600.0)
        if lease is None:
            raise RuntimeError(f"the lease of the new log {path} is already held")
        registered = pb.Event()
        body = registered.task_manager_registered
        body.task_manager_id = "tm-1"
        body.address = "127.0.0.1"
        body.port = worker_port
        body.slots = 4
        body.incarnation = INCARNATION
        body.registration_id = 1
        await log.append([registered], lease.epoch)
        heartbeat = heartbeat_event("tm-1", 1)
        remaining = events - 2
        while remaining > 0:
            batch = min(remaining, _FILL_BATCH)
            await log.append([heartbeat] * batch, lease.epoch)
            remaining -= batch
        last = await log.last_seq()
        await log.release_lease(lease)
    if last != events:
        raise RuntimeError(f"{path} ends at seq {last}, expected {events}")
    return time.perf_counter() - started


async def write_snapshot(path: Path) -> int:
    """Replay the log in this process, save a snapshot at its end and return
    the snapshot's size in bytes."""
    async with SqliteEventLog(path) as log:
        state, _ = await replay(log)
        snapshot = pb.Snapshot(seq=state.applied_seq, epoch=state.epoch, state=state)
        snapshot.taken.GetCurrentTime()
        await log.save_snapshot(snapshot)
    return len(snapshot.SerializeToString())


@dataclasses.dataclass(frozen=True)
class Start:
    """One coordinator start: seconds until it led, and the replay it logged."""

    seconds: float
    replayed_events: int
    replay_ms: int


RESTART_OPTIONS = [
    # No snapshot of the coordinator's own, so the runs without a snapshot
    # stay without one.
    "--snapshot-every",
    "0",
    "--heartbeat-interval",
    "60",
    "--heartbeat-timeout",
    "3600",
]


async def time_start(db: Path, log_path: Path) -> Start:
    coordinator = CoordinatorProcess(str(db), log_path, RESTART_OPTIONS)
    try:
        seconds = await coordinator.start()
    finally:
        await coordinator.stop()
    events, replay_ms = coordinator.last_replay()
    return Start(seconds, events, replay_ms)


@dataclasses.dataclass(frozen=True)
class Restarts:
    build_s: float
    empty: list[Start]
    without_snapshot: list[Start]
    with_snapshot: list[Start]
    snapshot_bytes: int


async def measure_restarts(
    folder: Path, settings: Settings, worker_port: int
) -> Restarts:
    empty = [
        await time_start(folder / f"empty-{i}.db", folder / "restart-empty.log")
        for i in range(settings.repetitions)
    ]
    path = folder / "restart.db"
    build_s = await build_restart_log(path, settings.restart_events, worker_port)
    log_path = folder / "restart.log"
    without = [await time_start(path, log_path) for _ in range(settings.repetitions)]
    snapshot_bytes = await write_snapshot(path)
    with_snapshot = [
        await time_start(path, log_path) for _ in range(settings.repetitions)
    ]
    return Restarts(build_s, empty, without, with_snapshot, snapshot_bytes)


# ------------------------------------------------------------ report


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _median_cores(runs: Sequence[Run]) -> float | None:
    cores = [r.coordinator_cores for r in runs if r.coordinator_cores is not None]
    return round(_median(cores), 2) if cores else None


def _median_client_cores(runs: Sequence[Run]) -> float:
    return round(_median([r.client_cores for r in runs]), 2)


def _print_runs(case: str, runs: Sequence[Run]) -> None:
    rates = ", ".join(f"{run.rate:,.0f}" for run in runs)
    cores = _median_cores(runs)
    busy = f"; CPU cores busy: clients {_median_client_cores(runs):.2f}"
    if cores is not None:
        busy += f", coordinator {cores:.2f}"
    print(
        f"{case + ':':<40}{_median([r.rate for r in runs]):>9,.0f} RPCs/s "
        f"(median; runs {rates}{busy})"
    )
    for run in runs:
        if run.failed or run.rejected:
            print(
                f"  note: {run.rejected} rejected and {run.failed} failed of "
                f"{run.rpcs} RPCs; first error: {run.first_error or 'none'}"
            )


def _print_starts(case: str, starts: Sequence[Start]) -> None:
    seconds = ", ".join(f"{s.seconds:.3f}" for s in starts)
    replay_ms = _median([s.replay_ms for s in starts])
    events = starts[0].replayed_events
    print(
        f"{case + ':':<40}{_median([s.seconds for s in starts]):>9.3f} s "
        f"(median; runs {seconds}); the replay of {events:,} "
        f"event{'' if events == 1 else 's'} took {replay_ms:.0f} ms"
    )


async def run(settings: Settings, folder: Path) -> dict[str, Any]:
    """Run every case with files in ``folder`` and return the figures."""
    context = multiprocessing.get_context("spawn")
    worker = BenchWorker()
    await worker.start()
    targets: dict[str, Target] = {}
    heartbeats: dict[str, list[Run]] = {log: [] for log in LOGS}
    acks: dict[str, list[Run]] = {log: [] for log in LOGS}
    try:
        for log in LOGS:
            targets[log] = await start_target(log, folder, settings, worker)
        print(
            f"job: {len(targets['sqlite'].tasks)} tasks (3 vertices of "
            f"parallelism {settings.parallelism}) on {WORKERS} task managers; "
            f"{CLIENT_PROCESSES} client processes with {CALLS_IN_FLIGHT} calls "
            "in flight each"
        )
        for _ in range(settings.repetitions):
            for log in LOGS:
                heartbeats[log].append(
                    await measure_heartbeats(context, targets[log], settings)
                )
        for log in LOGS:
            _print_runs(f"SendHeartbeat, {log} log", heartbeats[log])
        for _ in range(settings.repetitions):
            for log in LOGS:
                acks[log].append(await measure_acks(context, targets[log], settings))
        for log in LOGS:
            _print_runs(f"AcknowledgeCheckpoint, {log} log", acks[log])
        # The tracing cases measure other coordinators and this one. The
        # in-memory one would still run its timers on the same CPUs.
        await targets["memory"].coordinator.stop()
        tracing = await measure_tracing(
            context, settings, folder, worker, targets["sqlite"]
        )
    finally:
        for target in targets.values():
            await target.coordinator.stop()

    try:
        restarts = await measure_restarts(folder, settings, worker.port)
    finally:
        await worker.stop()
    _print_starts("start on an empty log", restarts.empty)
    events = f"{settings.restart_events:,} events"
    _print_starts(f"restart on {events}, no snapshot", restarts.without_snapshot)
    _print_starts(f"restart on {events}, snapshot", restarts.with_snapshot)
    print(
        f"writing the {events} took {restarts.build_s:.1f} s; the snapshot has "
        f"{restarts.snapshot_bytes:,} bytes"
    )

    figures = throughput_figures(heartbeats, acks)
    heartbeat_ratio = figures["ratio_heartbeat_sqlite_to_memory"]
    ack_ratio = figures["ratio_ack_sqlite_to_memory"]
    print(f"durable / in-memory: SendHeartbeat {heartbeat_ratio:.3f}, ", end="")
    print(f"AcknowledgeCheckpoint {ack_ratio:.3f} (target 0.9 or more)")
    with_snapshot_s = _median([s.seconds for s in restarts.with_snapshot])
    print(f"restart with a snapshot: {with_snapshot_s:.3f} s (target under 1 s)")
    return {
        "benchmark": "coordinator",
        "quick": settings.quick,
        "nproc": cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "filesystem": filesystem_type(folder),
        "repetitions": settings.repetitions,
        "tracing_repetitions": settings.tracing_repetitions,
        "client_processes": CLIENT_PROCESSES,
        "calls_in_flight_per_process": CALLS_IN_FLIGHT,
        "heartbeat_seconds": settings.heartbeat_s,
        "job_tasks": len(targets["sqlite"].tasks),
        "checkpoints_per_ack_run": settings.checkpoints,
        **figures,
        **tracing,
        "restart_events": settings.restart_events,
        "restart_log_write_s": round(restarts.build_s, 2),
        "start_empty_log_s": _rounded_median(restarts.empty),
        "restart_without_snapshot_s": _rounded_median(restarts.without_snapshot),
        "replay_without_snapshot_ms": _median(
            [s.replay_ms for s in restarts.without_snapshot]
        ),
        "restart_with_snapshot_s": _rounded_median(restarts.with_snapshot),
        "replay_with_snapshot_ms": _median(
            [s.replay_ms for s in restarts.with_snapshot]
        ),
        "snapshot_bytes": restarts.snapshot_bytes,
    }


async def run_tracing(settings: Settings, folder: Path) -> dict[str, Any]:
    """Run only the tracing case, against its own untraced coordinator."""
    context = multiprocessing.get_context("spawn")
    worker = BenchWorker()
    await worker.start()
    untraced: Target | None = None
    try:
        untraced = await start_target("sqlite", folder, settings, worker)
        tracing = await measure_tracing(context, settings, folder, worker, untraced)
    finally:
        if untraced is not None:
            await untraced.coordinator.stop()
        await worker.stop()
    return {
        "benchmark": "coordinator tracing",
        "quick": settings.quick,
        "tracing_repetitions": settings.tracing_repetitions,
        **tracing,
    }


def _rounded_median(starts: Sequence[Start]) -> float:
    return round(_median([s.seconds for s in starts]), 3)


def throughput_figures(
    heartbeats: dict[str, list[Run]], acks: dict[str, list[Run]]
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for case, runs in (("heartbeat", heartbeats), ("ack", acks)):
        for log in LOGS:
            rate = _median([r.rate for r in runs[log]])
            figures[f"{case}_{log}_rpcs_per_s"] = round(rate)
            figures[f"{case}_{log}_rejected"] = sum(r.rejected for r in runs[log])
            figures[f"{case}_{log}_failed"] = sum(r.failed for r in runs[log])
            figures[f"{case}_{log}_coordinator_cores"] = _median_cores(runs[log])
            figures[f"{case}_{log}_client_cores"] = _median_client_cores(runs[log])
        ratio = (
            figures[f"{case}_sqlite_rpcs_per_s"] / figures[f"{case}_memory_rpcs_per_s"]
        )
        figures[f"ratio_{case}_sqlite_to_memory"] = round(ratio, 3)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.coordinator",
        description="Measure the coordinator's RPC throughput and restart time.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="0.8 s heartbeat runs in place of 3 s, a job of 96 tasks in place "
        "of 384 and a restart log of 100,000 events in place of 1,000,000",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="folder in which the temporary SQLite files and coordinator logs "
        "are created (default: the system's temporary folder); it must be on "
        "the disk to be measured",
    )
    parser.add_argument(
        "--tracing-only",
        action="store_true",
        help="measure only AcknowledgeCheckpoint with tracing off and on",
    )
    parser.add_argument(
        "--repetitions",
        type=int,
        default=None,
        help="runs of each case, taking turns (default: 3, and 7 for the "
        "tracing cases of a full run); the median counts",
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.repetitions is not None:
        if args.repetitions < 1:
            parser.error(f"--repetitions {args.repetitions}: give 1 or more")
        settings = dataclasses.replace(
            settings,
            repetitions=args.repetitions,
            tracing_repetitions=args.repetitions,
        )
    with tempfile.TemporaryDirectory(prefix="jobledger-bench-", dir=args.dir) as name:
        folder = Path(name)
        mode = "quick" if settings.quick else "full"
        print(f"jobledger coordinator benchmark, {mode} run")
        print(
            f"machine: {cpu_count()} CPUs, Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}, files in {folder} "
            f"({filesystem_type(folder)})"
        )
        runner = run_tracing if args.tracing_only else run
        figures = asyncio.run(runner(settings, folder))
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
