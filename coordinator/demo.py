"""``jobledger demo``: the flight-delays job on a local cluster, verified.

The demo starts a coordinator and two workers as subprocesses on 127.0.0.1,
on a SQLite log in a data folder of its own, submits
``examples/flight_delays.yaml`` with a checkpoint every second, and waits
for the job to finish. Then it compares the rows the sink committed with the
same figures computed directly from the CSV in one pass. It can SIGKILL a
worker or the coordinator while the job runs. A killed coordinator is started
again on the same log and port, and the job carries on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from coordinator.jobspec import load_job_graph
from coordinator.local_cluster import ClusterError, LocalCluster
from jobledger_examples import flights
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobmanager_internal_pb2 as fpb

logger = logging.getLogger(__name__)

SPEC = Path(__file__).resolve().parent.parent / "examples" / "flight_delays.yaml"
# Seconds between two polls of the job's state.
POLL_S = 0.25
# Seconds without a response from the coordinator after which the demo stops.
UNSERVED_LIMIT_S = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class DemoOptions:
    """The settings of one demo run; ``add_demo_parser`` describes each one."""

    data_dir: Path
    rows: int | None = None
    kill_worker_at: float | None = None
    kill_coordinator_at: float | None = None
    checkpoint_interval_s: float = 1.0
    # A pause after each row in every source subtask, in ms; 0 runs flat out.
    delay_ms: float = 0.0
    timeout_s: float = 600.0
    spec: Path = SPEC
    progress: bool = True


@dataclasses.dataclass(slots=True)
class DemoResult:
    """The outcome of one run, as ``--json`` prints it."""

    records: int
    checkpoints_completed: int
    recoveries: int
    elapsed_s: float
    verified: bool
    output_rows: int = 0
    mismatches: list[str] = dataclasses.field(default_factory=list)
    faults: list[str] = dataclasses.field(default_factory=list)
    # Faults requested but not injected, because the job finished first.
    faults_not_injected: list[str] = dataclasses.field(default_factory=list)
    # CPU seconds each process has used by the end of the job, start included.
    cpu_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    worst_carriers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    data_dir: str = ""

    def summary(self) -> dict[str, Any]:
        """Return the figures as one JSON object, with 10 mismatches at most."""
        return {
            "records": self.records,
            "checkpoints_completed": self.checkpoints_completed,
            "recoveries": self.recoveries,
            "elapsed_s": round(self.elapsed_s, 3),
            "records_per_s": round(self.records / self.elapsed_s)
            if self.elapsed_s
            else 0,
            "verified": self.verified,
            "output_rows": self.output_rows,
            "mismatches": self.mismatches[:10],
            "faults": self.faults,
            "faults_not_injected": self.faults_not_injected,
            "cpu_seconds": {k: round(v, 2) for k, v in self.cpu_seconds.items()},
            "worst_carriers": self.worst_carriers,
            "data_dir": self.data_dir,
        }


class DemoError(RuntimeError):
    """The demo could not run the job to its end; the message gives the reason."""


# ---------------------------------------------------------------- progress


class Progress:
    """Follows the job through the AdminService and draws a bar on stderr.

    Checkpoints completed are counted from the log's CheckpointCompleted
    events (WatchEvents), so the count survives a coordinator restart. The
    records come from the workers' task metrics in the job state.
    """

    def __init__(
        self, job_id: str, source_vertices: set[str], total_rows: int, draw: bool
    ) -> None:
        self.job_id = job_id
        self.source_vertices = source_vertices
        self.total_rows = total_rows
        self.draw = draw
        self.started = time.monotonic()
        self.completed: set[int] = set()
        self.recoveries = 0
        self.records_read = 0
        self._last_seq = 0
        self._last_line = 0.0
        self._tty = sys.stderr.isatty()

    async def watch_events(self, cluster: LocalCluster) -> None:
        """Count completed checkpoints until cancelled; resume after errors."""
        while True:
            try:
                request = svc.WatchEventsRequest(from_seq=self._last_seq + 1)
                async for event in cluster.admin.WatchEvents(request):
                    self._last_seq = event.seq
                    body = event.checkpoint_completed
                    if event.HasField("checkpoint_completed") and (
                        body.job_id == self.job_id
                    ):
                        self.completed.add(body.checkpoint_id)
            except grpc.aio.AioRpcError as exc:
                logger.debug("WatchEvents ended: %s", exc.code().name)
            await asyncio.sleep(POLL_S)

    def update(self, job: pb.JobState) -> None:
        """Take the figures of one GetJob reply and redraw the bar."""
        self.recoveries = job.restarts
        self.records_read = sum(
            task.records_in
            for task in job.tasks.values()
            if task.job_vertex_id in self.source_vertices
        )
        self.render(pb.JobStatus.Name(job.status))

    def render(
        self, status: str, final: bool = False, elapsed_s: float | None = None
    ) -> None:
        """Draw the bar: in place on a terminal, else a line every 5 s."""
        if not self.draw:
            return
        now = time.monotonic()
        if not (self._tty or final or now - self._last_line >= 5.0):
            return
        self._last_line = now
        elapsed = now - self.started if elapsed_s is None else elapsed_s
        done = min(1.0, self.records_read / max(1, self.total_rows))
        bar = "#" * int(done * 30)
        rate = self.records_read / elapsed if elapsed > 0 else 0.0
        line = (
            f"[{bar:<30}] {self.records_read:>7}/{self.total_rows} rows "
            f"{rate:>8,.0f}/s  checkpoints {len(self.completed):>3}  "
            f"recoveries {self.recoveries}  {status.removeprefix('JOB_').lower()}"
        )
        end = "\n" if final or not self._tty else ""
        print(("\r" if self._tty else "") + line, end=end, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- run


def pace_sources(graph: fpb.JobGraph, delay_ms: float) -> None:
    """Set ``delay_ms`` on every source of the graph, in place."""
    for vertex in graph.vertices:
        if vertex.vertex_type == fpb.SOURCE:
            vertex.operator_definition.configuration["delay_ms"] = delay_ms


def prepare_data(options: DemoOptions) -> int:
    """Create the data folder and extract the flights; return the row count.

    Raises DemoError when the folder contains the log of an earlier run, whose
    jobs, snapshots and output would mix with this run's.
    """
    if (options.data_dir / "log.db").exists():
        raise DemoError(
            f"{options.data_dir} contains the log of an earlier run; give a new "
            "--data-dir or remove that folder"
        )
    options.data_dir.mkdir(parents=True, exist_ok=True)
    (options.data_dir / "output").mkdir(exist_ok=True)
    return flights.extract(options.data_dir / "flights.csv", options.rows)


def sink_paths(graph: fpb.JobGraph, data_dir: Path) -> list[Path]:
    """Return the output file of every sink subtask of the graph."""
    paths = []
    for vertex in graph.vertices:
        definitions = [vertex.operator_definition, *vertex.chained_operators]
        for definition in definitions:
            if definition.fully_qualified_name != "jobledger.sink.file":
                continue
            template = str(definition.configuration["path"])
            for index in range(max(1, vertex.parallelism)):
                path = Path(template.replace("{subtask}", str(index)))
                paths.append(path if path.is_absolute() else data_dir / path)
    return paths


async def submit(cluster: LocalCluster, graph: fpb.JobGraph) -> str:
    """Submit the job; return its id or raise DemoError with the reason."""
    reply = await cluster.jm.SubmitJob(
        fpb.SubmitJobRequest(job_graph=graph), timeout=30
    )
    if not reply.success:
        raise DemoError(f"the coordinator rejected the job: {reply.message}")
    return str(reply.job_id)


async def get_job(cluster: LocalCluster, job_id: str) -> pb.JobState | None:
    """Return the job's state, or None while the coordinator does not serve."""
    try:
        job: pb.JobState = await cluster.admin.GetJob(
            svc.GetJobRequest(job_id=job_id), timeout=5
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ):
            return None
        raise
    return job


class FaultPlan:
    """The kills a run injects, each once, at seconds after submission."""

    def __init__(self, options: DemoOptions) -> None:
        self.worker_at = options.kill_worker_at
        self.coordinator_at = options.kill_coordinator_at
        # What was done, in order, for the result.
        self.injected: list[str] = []

    async def inject(self, cluster: LocalCluster, elapsed: float) -> None:
        if self.worker_at is not None and elapsed >= self.worker_at:
            self.worker_at = None
            index = len(cluster.workers) - 1
            await cluster.kill_worker(index)
            self.injected.append(f"worker {index + 1} killed")
        if self.coordinator_at is not None and elapsed >= self.coordinator_at:
            self.coordinator_at = None
            await cluster.kill_coordinator()
            await cluster.start_coordinator()
            self.injected.append("coordinator killed and restarted")

    def pending(self) -> list[str]:
        """Return the faults not injected, because the job ended before."""
        pending = []
        if self.worker_at is not None:
            pending.append(f"kill a worker at {self.worker_at:g} s")
        if self.coordinator_at is not None:
            pending.append(f"kill the coordinator at {self.coordinator_at:g} s")
        return pending


async def run_job(
    cluster: LocalCluster,
    graph: fpb.JobGraph,
    options: DemoOptions,
    rows: int,
    faults: FaultPlan,
) -> tuple[Progress, float]:
    """Submit the job and follow it to JOB_FINISHED; return the progress and
    the seconds from submission to the end. Raises DemoError otherwise."""
    job_id = await submit(cluster, graph)
    logger.info("job %s submitted", job_id)
    sources = {v.id for v in graph.vertices if v.vertex_type == fpb.SOURCE}
    progress = Progress(job_id, sources, rows, options.progress)
    watcher = asyncio.create_task(progress.watch_events(cluster))
    try:
        elapsed = await _follow(cluster, job_id, options, faults, progress)
        # The final CheckpointCompleted events may still be on their way.
        await asyncio.sleep(POLL_S)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    progress.records_read = rows
    progress.render("finished", final=True, elapsed_s=elapsed)
    return progress, elapsed


async def _follow(
    cluster: LocalCluster,
    job_id: str,
    options: DemoOptions,
    faults: FaultPlan,
    progress: Progress,
) -> float:
    """Poll the job and inject the faults until the job finishes; return the
    seconds from submission to the end. Raises DemoError or ClusterError."""
    started = last_served = time.monotonic()
    while True:
        now = time.monotonic()
        _check_deadlines(job_id, options, now - started, now - last_served)
        cluster.check_coordinator()
        await faults.inject(cluster, now - started)
        job = await get_job(cluster, job_id)
        if job is not None:
            last_served = time.monotonic()
            progress.update(job)
            if job.status == pb.JOB_FINISHED:
                # The coordinator's own times, free of the polling delay.
                finished_s = (job.status_changed_ms - job.submitted_ms) / 1000
                return finished_s if finished_s > 0 else last_served - started
            if job.status in (pb.JOB_FAILED, pb.JOB_CANCELED):
                raise DemoError(
                    f"job {job_id} ended {pb.JobStatus.Name(job.status)}: "
                    f"{job.failure_reason}"
                )
        await asyncio.sleep(POLL_S)


def _check_deadlines(
    job_id: str, options: DemoOptions, elapsed_s: float, unserved_s: float
) -> None:
    if elapsed_s > options.timeout_s:
        raise DemoError(
            f"job {job_id} did not finish within {options.timeout_s} s; "
            f"see the logs in {options.data_dir / 'logs'}"
        )
    if unserved_s > UNSERVED_LIMIT_S:
        raise DemoError(
            f"the coordinator has not responded for {unserved_s:.0f} s; see its "
            f"log in {options.data_dir / 'logs'}"
        )


def verify(
    graph: fpb.JobGraph, options: DemoOptions
) -> tuple[dict[tuple[str, str], dict[str, Any]], list[str]]:
    """Compare the committed output with the direct computation; return the
    output rows and a description of every difference."""
    output = flights.read_output(sink_paths(graph, options.data_dir))
    expected = flights.daily_delays(options.data_dir / "flights.csv")
    mismatches = []
    for key in sorted(expected.keys() | output.keys()):
        if output.get(key) != expected.get(key):
            mismatches.append(
                f"{key[0]} {key[1]}: output {output.get(key)}, "
                f"expected {expected.get(key)}"
            )
    return output, mismatches


async def run_demo(options: DemoOptions) -> DemoResult:
    """Run the whole demo; raise DemoError or ClusterError when it cannot.

    SIGTERM cancels the run like Ctrl-C does, so the cluster is stopped on
    both; the caller then sees asyncio.CancelledError.
    """
    main = asyncio.current_task()
    if main is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    graph = load_job_graph(options.spec)
    if options.delay_ms:
        pace_sources(graph, options.delay_ms)
    rows = prepare_data(options)
    cluster = LocalCluster(options.data_dir, options.checkpoint_interval_s)
    faults = FaultPlan(options)
    try:
        await cluster.start()
        if options.progress:
            print(
                f"jobledger demo: coordinator on {cluster.address}, 2 workers, "
                f"{rows:,} flights; data, logs and output in {options.data_dir}",
                file=sys.stderr,
            )
        progress, elapsed = await run_job(cluster, graph, options, rows, faults)
        cpu_seconds = cluster.cpu_seconds()
    finally:
        await cluster.stop()
    output, mismatches = verify(graph, options)
    return DemoResult(
        records=rows,
        checkpoints_completed=len(progress.completed),
        recoveries=progress.recoveries,
        elapsed_s=elapsed,
        verified=not mismatches and bool(output),
        output_rows=len(output),
        mismatches=mismatches,
        faults=faults.injected,
        faults_not_injected=faults.pending(),
        cpu_seconds=cpu_seconds,
        worst_carriers=flights.worst_carriers(output),
        data_dir=str(options.data_dir),
    )


# ---------------------------------------------------------------- CLI


def print_report(result: DemoResult) -> None:
    """Print the worst carriers and the verification for people."""
    print("Carriers with the worst mean departure delay in the data:")
    for rank, carrier in enumerate(result.worst_carriers, start=1):
        print(
            f"  {rank}. {carrier['carrier']:<3} {carrier['mean_dep_delay']:>6.2f} min "
            f"over {carrier['flights']:,} flights"
        )
    print(
        f"{result.records:,} flights in {result.elapsed_s:.1f} s "
        f"({result.records / max(result.elapsed_s, 1e-9):,.0f}/s); "
        f"checkpoints completed: {result.checkpoints_completed}, "
        f"recoveries: {result.recoveries}"
    )
    for fault in result.faults:
        print(f"fault injected: {fault}")
    for fault in result.faults_not_injected:
        print(f"fault not injected, the job finished before: {fault}")
    if result.verified:
        print(
            f"verified: the {result.output_rows:,} committed rows (carrier and day) "
            "equal the direct computation from the CSV"
        )
        return
    print(f"NOT verified: {len(result.mismatches)} rows differ", file=sys.stderr)
    for line in result.mismatches[:10]:
        print(f"  {line}", file=sys.stderr)


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give 0 or more")
    return value


def _rows(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} rows: give 1 or more")
    return value


def add_demo_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``demo`` subcommand; its handler returns the exit status."""
    parser = commands.add_parser(
        "demo",
        help="run the flight-delays job on a local cluster and verify its output",
    )
    parser.add_argument(
        "--rows", type=_rows, help="use only the first N flights (default: all)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="folder for the log, the state and the output "
        "(default: data/demo-<UTC timestamp>)",
    )
    parser.add_argument(
        "--kill-worker-at",
        type=_non_negative,
        metavar="SECONDS",
        help="SIGKILL the second worker this many seconds after submission",
    )
    parser.add_argument(
        "--kill-coordinator-at",
        type=_non_negative,
        metavar="SECONDS",
        help="SIGKILL the coordinator this many seconds after submission, "
        "then start it again on the same log",
    )
    parser.add_argument(
        "--checkpoint-interval",
        type=float,
        default=1.0,
        help="seconds between checkpoints (default %(default)s)",
    )
    parser.add_argument(
        "--delay-ms",
        type=_non_negative,
        default=0.0,
        help="pause after each row in every source subtask, in ms, to watch "
        "the job or kill a process mid-run (default 0: no pause)",
    )
    parser.add_argument(
        "--timeout",
        type=_non_negative,
        default=600.0,
        help="seconds the job may take before the demo gives up (default %(default)s)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with the figures instead of the report",
    )
    parser.set_defaults(handler=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    """Run ``jobledger demo``; return 0 only when the output is verified."""
    if args.checkpoint_interval <= 0:
        raise ValueError(
            f"--checkpoint-interval {args.checkpoint_interval} must be positive"
        )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    options = DemoOptions(
        data_dir=(args.data_dir or Path("data") / f"demo-{stamp}").resolve(),
        rows=args.rows,
        kill_worker_at=args.kill_worker_at,
        kill_coordinator_at=args.kill_coordinator_at,
        checkpoint_interval_s=args.checkpoint_interval,
        delay_ms=args.delay_ms,
        timeout_s=args.timeout,
    )
    try:
        result = asyncio.run(run_demo(options))
    except (DemoError, ClusterError, flights.DataError) as exc:
        print(f"jobledger demo: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print("jobledger demo: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print_report(result)
    return 0 if result.verified else 1
