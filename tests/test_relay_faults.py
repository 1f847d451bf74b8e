"""The span relay under faults, with real processes on 127.0.0.1.

A real coordinator (and workers) export to a collector that this test
process serves. The coordinator, its export process and the process group
are killed, stopped and terminated, and the collector is missing, late or
stuck. Bounds are the relay's own: a process exits within one export
timeout (OTEL_EXPORTER_OTLP_TIMEOUT) and ``relay.EXIT_GRACE_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.trace.v1 import trace_pb2

from observability import relay
from protos import jobledger_services_pb2 as svc
from tests.helpers.coordinator_process import (
    REPO_ROOT,
    CoordinatorProcess,
    coordinator_command,
    free_port,
)
from tests.helpers.otlp_collector import TraceCollector

OVERVIEW = "GetOverview"


# ------------------------------------------------------------ processes


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def export_children(parent: int) -> list[int]:
    """The running ``observability.relay`` processes whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is None or fields[0] == "Z" or int(fields[1]) != parent:
            continue
        with contextlib.suppress(OSError):
            if b"observability.relay" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def wait_gone(pid: int, timeout_s: float = 30.0) -> float:
    """Wait until ``pid`` has exited; return how long that took."""
    started = time.monotonic()
    while running(pid):
        waited = time.monotonic() - started
        assert waited < timeout_s, f"process {pid} still runs after {timeout_s} s"
        time.sleep(0.02)
    return time.monotonic() - started


async def wait_child(parent: int, other_than: int | None = None) -> int:
    """Return the pid of ``parent``'s export process, polling for up to 30 s."""
    deadline = time.monotonic() + 30
    while True:
        children = [pid for pid in export_children(parent) if pid != other_than]
        if children:
            assert len(children) == 1, children
            return children[0]
        assert time.monotonic() < deadline, f"process {parent} has no export process"
        await asyncio.sleep(0.05)


class Reaper:
    """Remembers every export process a test saw and kills those left over."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def track(self, pid: int) -> int:
        self.pids.add(pid)
        return pid

    def leftovers(self) -> list[int]:
        return sorted(pid for pid in self.pids if running(pid))

    def kill_all(self) -> None:
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def coordinators(tmp_path: Path) -> AsyncIterator[list[CoordinatorProcess]]:
    started: list[CoordinatorProcess] = []
    yield started
    for coordinator in started:
        with contextlib.suppress(ProcessLookupError):
            if coordinator.process is not None:
                coordinator.process.send_signal(signal.SIGCONT)
        await coordinator.close()


@pytest.fixture
async def reaper(
    coordinators: list[CoordinatorProcess],
) -> AsyncIterator[Reaper]:
    """Export processes, checked after the test's coordinators were killed."""
    reaper = Reaper()
    try:
        yield reaper
        for coordinator in coordinators:
            await coordinator.close()
        # An export process that lost its parent exports for at most one
        # export timeout (10 s by default) before it exits.
        deadline = time.monotonic() + 10 + relay.EXIT_GRACE_S
        while reaper.leftovers() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = reaper.leftovers()
    finally:
        reaper.kill_all()
    assert not left, f"export processes left running: {left}"


# ------------------------------------------------------------ collectors


class StuckCollector(TraceCollector):
    """A collector whose Export does not reply until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.entered.set()
        self.release.wait(60)
        return super().Export(request, context)


@contextlib.contextmanager
def serving(servicer: TraceCollector, port: int = 0) -> Iterator[TraceCollector]:
    """Serve ``servicer`` on ``port`` (0: a free one) of 127.0.0.1 in the block."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    servicer.port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield servicer
    finally:
        if isinstance(servicer, StuckCollector):
            servicer.release.set()
        server.stop(None)


@pytest.fixture
def collector() -> Iterator[TraceCollector]:
    with serving(TraceCollector()) as servicer:
        yield servicer


def overview_spans(collector: TraceCollector) -> int:
    """Count the spans of GetOverview calls that succeeded.

    A coordinator that does not lead yet rejects its first calls with
    UNAVAILABLE, and how many there are depends on timing.
    """
    return sum(
        OVERVIEW in span.name and span.status.code != trace_pb2.Status.STATUS_CODE_ERROR
        for span in collector.spans()
    )


async def wait_overview_spans(
    collector: TraceCollector, count: int, timeout_s: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while overview_spans(collector) < count:
        assert time.monotonic() < deadline, (
            f"{overview_spans(collector)} of {count} GetOverview spans arrived"
        )
        await asyncio.sleep(0.05)


# ------------------------------------------------------------ coordinators


@pytest.fixture
def tracing_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Environment of a traced coordinator; the test sets the endpoint."""
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "5000")
    return monkeypatch


async def start_coordinator(
    tmp_path: Path,
    coordinators: list[CoordinatorProcess],
    reaper: Reaper,
    new_session: bool = False,
) -> tuple[CoordinatorProcess, int]:
    """Start a traced coordinator; return it and its export process's pid.

    ``new_session`` starts it as the leader of a process group of its own,
    as a service manager does.
    """
    coordinator = CoordinatorProcess(
        tmp_path / f"log-{len(coordinators)}.db", free_port(), tmp_path
    )
    coordinators.append(coordinator)
    if new_session:
        coordinator.starts += 1
        coordinator.log_path = tmp_path / f"coordinator-{coordinator.port}.log"
        with coordinator.log_path.open("wb") as output:
            coordinator.process = await asyncio.create_subprocess_exec(
                *coordinator_command(),
                "coordinator",
                "--db",
                coordinator.db,
                "--listen",
                coordinator.address,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        await coordinator._open_channel()
        await coordinator.wait_serving()
    else:
        await coordinator.start()
    assert coordinator.process is not None
    child = reaper.track(await wait_child(coordinator.process.pid))
    return coordinator, child


async def call(coordinator: CoordinatorProcess, count: int) -> None:
    for _ in range(count):
        await coordinator.admin.GetOverview(svc.GetOverviewRequest(), timeout=10)


def log_of(coordinator: CoordinatorProcess) -> str:
    assert coordinator.log_path is not None
    return coordinator.log_path.read_text(errors="replace")


# ------------------------------------------------------------ the tests


async def test_coordinator_sigkill_keeps_spans_no_orphan(
    tmp_path: Path,
    tracing_env: pytest.MonkeyPatch,
    collector: TraceCollector,
    coordinators: list[CoordinatorProcess],
    reaper: Reaper,
) -> None:
    # The spans wait in the export process for the 5 s schedule delay. A
    # SIGKILL of the coordinator ends its input, so it sends them then.
    tracing_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    coordinator, child = await start_coordinator(tmp_path, coordinators, reaper)
    await call(coordinator, 30)
    await asyncio.sleep(5 * relay.HAND_OVER_S)
    await coordinator.kill()
    wait_gone(child)
    # The 30 calls and the GetOverview of the start.
    await wait_overview_spans(collector, 31)


async def test_coordinator_export_process_lower_priority(
    tmp_path: Path,
    tracing_env: pytest.MonkeyPatch,
    collector: TraceCollector,
    coordinators: list[CoordinatorProcess],
    reaper: Reaper,
) -> None:
    tracing_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    coordinator, child = await start_coordinator(tmp_path, coordinators, reaper)
    assert coordinator.process is not None
    parent_nice = os.getpriority(os.PRIO_PROCESS, coordinator.process.pid)
    expected = min(19, parent_nice + relay.NICENESS)
    # The export process lowers its own priority as it starts.
    deadline = time.monotonic() + 30
    while os.getpriority(os.PRIO_PROCESS, child) != expected:
        assert time.monotonic() < deadline, os.getpriority(os.PRIO_PROCESS, child)
        await asyncio.sleep(0.05)
    assert os.getpriority(os.PRIO_PROCESS, coordinator.process.pid) == parent_nice
    await call(coordinator, 10)
    await wait_overview_spans(collector, 11)


async def test_coordinator_sigterm_flushes_and_child_exits(
    tmp_path: Path,
    tracing_env: pytest.MonkeyPatch,
    collector: TraceCollector,
    coordinators: list[CoordinatorProcess],
    reaper: Reaper,
) -> None:
    tracing_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    coordinator, child = await start_coordinator(tmp_path, coordinators, reaper)
    await call(coordinator, 30)
    # No wait: the spans of the last hand-over go out at shutdown too.
    assert await coordinator.terminate(30) == 0
    wait_gone(child)
    assert overview_spans(collector) == 31
    assert "Traceback" not in log_of(coordinator)


@pytest.mark.parametrize(
    ("signum", "status"),
    [(signal.SIGTERM, 0), (signal.SIGINT, 0), (signal.SIGHUP, -signal.SIGHUP)],
)
async def test_signal_to_the_process_group_keeps_the_spans(
    signum: signal.Signals,
    status: int,
    tmp_path: Path,
    tracing_env: pytest.MonkeyPatch,
    collector: TraceCollector,
    coordinators: list[CoordinatorProcess],
    reaper: Reaper,
) -> None:
    # systemd (KillMode=control-group), GNU timeout and `kill -TERM -PGID`
    # signal the whole group, export process included, as do Ctrl-C and a
    # closed terminal. The export process must outlive its parent's
    # shutdown (SIGTERM, SIGINT) or death (SIGHUP, not handled) and send
    # the spans it holds.
    tracing_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    coordinator, child = await start_coordinator(
        tmp_path, coordinators, reaper, new_session=True
    )
    assert coordinator.process is not None
    await call(coordinator, 30)
    await asyncio.sleep(5 * relay.HAND_OVER_S)
    os.killpg(coordinator.process.pid, signum)
    assert await asyncio.wait_for(coordinator.process.wait(), 30) == status
    wait_gone(child)
    await wait_overview_spans(collector, 31)


async def test_export_child_sigkill_is_replaced_while_serving(
    tmp_path: Path,
    tracing_env: pytest.MonkeyPatch,
    collector: TraceCollector,
    coordinators: list[CoordinatorProcess],
    reaper: Reaper,
) -> None:
    tracing_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    tracing_env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    coordinator, first = await start_coordinator(tmp_path, coordinators, reaper)
    assert coordinator.process is not None
    os.kill(first, signal.SIGKILL)

    # Calls go on while no export process runs, and their spans are lost. A
    # hand-over with spans to send starts the next one, RESPAWN_S after
    # the first.
    deadline = time.monotonic() + relay.RESPAWN_S + 25
    while True:
        children = [
            pid for pid in export_children(coordinator.process.pid) if pid != first
        ]
        if children:
            break
        assert time.monotonic() < deadline, "no new export process"
        await call(coordinator, 5)
        await asyncio.sleep(0.02)

    second = reaper.track(children[0])
    before = overview_spans(collector)
    await call(coordinator, 20)
    await wait_overview_spans(collector, before + 20)
    assert await coordinator.terminate(30) == 0
    wait_gone(second)

    log = log_of(coordinator)
    assert f"span export process {first} exited with status -9" in log
    assert "Traceback" not in log
    # Spans lost until the next export process starts are counted, not
    # logged on every hand-over (10 a second).
    warnings = log.count("spans lost: no export process took them")
    assert warnings <= relay.RESPAWN_S + 3, f"{warnings} warnings of lost spans"


async def test_export_child_stopped_then_continued(
    tmp_path: Path,
    tracing_env: pytest.MonkeyPatch,
    collector: TraceCollector,
    coordinators: list[CoordinatorProcess],
    reaper: Reaper,
) -> None:
    tracing_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    tracing_env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    tracing_env.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "256")
    tracing_env.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "64")
    coordinator, child = await start_coordinator(tmp_path, coordinators, reaper)
    os.kill(child, signal.SIGSTOP)
    try:
        # Far more spans than the pipe and the queue hold: the hand-over
        # blocks on the pipe, the calls must not.
        await asyncio.wait_for(
            asyncio.gather(*(call(coordinator, 500) for _ in range(4))), 60
        )
    finally:
        # The relay may have killed a child that took no input.
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)
    before = overview_spans(collector)
    await call(coordinator, 20)
    await wait_overview_spans(collector, before + 20)
    assert await coordinator.terminate(30) == 0
    wait_gone(child)
    log = log_of(coordinator)
    assert "spans dropped: more than OTEL_BSP_MAX_QUEUE_SIZE=256" in log
    assert "Traceback" not in log


async def test_sigterm_with_stopped_child_bounded(
    tmp_path: Path,
    tracing_env: pytest.MonkeyPatch,
    collector: TraceCollector,
    coordinators: list[CoordinatorProcess],
    reaper: Reaper,
) -> None:
    # A stopped (or hung) export process reads nothing: once the pipe is
    # full the hand-over thread blocks in its write. Shutdown must still end
    # within one export timeout and the grace, killing the export process.
    tracing_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    tracing_env.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    coordinator, child = await start_coordinator(tmp_path, coordinators, reaper)
    assert coordinator.process is not None
    os.kill(child, signal.SIGSTOP)
    try:
        await asyncio.wait_for(
            asyncio.gather(*(call(coordinator, 500) for _ in range(4))), 60
        )
        await asyncio.sleep(5 * relay.HAND_OVER_S)
        bound = 1 + relay.EXIT_GRACE_S
        started = time.monotonic()
        coordinator.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(coordinator.process.wait(), bound + 10)
        took = time.monotonic() - started
    finally:
        # The relay may have killed a child that took no input.
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)
    assert coordinator.process.returncode == 0, (
        f"SIGTERM: still running after {took:.1f} s (bound {bound} s)\n"
        + coordinator.log_tail()
    )
    wait_gone(child)


async def test_collector_started_late_gets_the_spans(
    tmp_path: Path,
    tracing_env: pytest.MonkeyPatch,
    coordinators: list[CoordinatorProcess],
    reaper: Reaper,
) -> None:
    port = free_port()
    tracing_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    tracing_env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    tracing_env.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
    coordinator, child = await start_coordinator(tmp_path, coordinators, reaper)
    await call(coordinator, 20)
    await asyncio.sleep(1)
    with serving(TraceCollector(), port) as late:
        deadline = time.monotonic() + 30
        while not overview_spans(late):
            assert time.monotonic() < deadline, "no spans after the collector started"
            await call(coordinator, 5)
            await asyncio.sleep(0.2)
        before = overview_spans(late)
        await call(coordinator, 20)
        await wait_overview_spans(late, before + 20)
        assert await coordinator.terminate(30) == 0
    wait_gone(child)


async def test_sigterm_collector_unreachable_bounded(
    tmp_path: Path,
    tracing_env: pytest.MonkeyPatch,
    coordinators: list[CoordinatorProcess],
    reaper: Reaper,
) -> None:
    tracing_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    tracing_env.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
    coordinator, child = await start_coordinator(tmp_path, coordinators, reaper)
    assert coordinator.process is not None
    await call(coordinator, 50)
    started = time.monotonic()
    bound = 2 + relay.EXIT_GRACE_S
    assert await coordinator.terminate(bound + 10) == 0
    took = time.monotonic() - started
    assert took < bound + 2, took
    wait_gone(child)


async def test_orphaned_child_exits_in_export_timeout(
    tmp_path: Path,
    tracing_env: pytest.MonkeyPatch,
    coordinators: list[CoordinatorProcess],
    reaper: Reaper,
) -> None:
    # The collector takes the first export and never replies. The
    # coordinator dies while that export runs. Its export process must
    # still give up within one export timeout of losing its input, not
    # one export timeout after the export in flight.
    timeout_s = 8
    with serving(StuckCollector()) as stuck:
        assert isinstance(stuck, StuckCollector)
        tracing_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", stuck.endpoint)
        tracing_env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        tracing_env.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", str(timeout_s))
        coordinator, child = await start_coordinator(tmp_path, coordinators, reaper)
        await call(coordinator, 5)
        deadline = time.monotonic() + 30
        while not stuck.entered.is_set():
            assert time.monotonic() < deadline, "no export reached the collector"
            await asyncio.sleep(0.02)
        # More spans, queued behind the export in flight.
        await call(coordinator, 20)
        await asyncio.sleep(5 * relay.HAND_OVER_S)
        await coordinator.kill()
        took = await asyncio.to_thread(wait_gone, child, 60)
    assert took < timeout_s + relay.EXIT_GRACE_S, (
        f"the export process outlived its parent by {took:.1f} s; "
        f"OTEL_EXPORTER_OTLP_TIMEOUT={timeout_s}"
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_BSP_MAX_QUEUE_SIZE", "abc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "0"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "abc"),
        # Every export fails at once: no span ever arrives.
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "-1"),
        # No span arrives, and shutdown is not bounded.
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "nan"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "zip"),
    ],
)
def test_bad_setting_stops_start(
    variable: str, value: str, tmp_path: Path, reaper: Reaper
) -> None:
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_METRICS_EXPORTER": "none",
        variable: value,
    }
    log_path = tmp_path / "coordinator.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *coordinator_command(),
                "coordinator",
                "--db",
                str(tmp_path / "log.db"),
                "--listen",
                f"127.0.0.1:{free_port()}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd=REPO_ROOT,
        )
    try:
        deadline = time.monotonic() + 60
        while process.poll() is None:
            for pid in export_children(process.pid):
                reaper.track(pid)
            text = log_path.read_text(errors="replace")
            assert " serving on " not in text, (
                f"the coordinator started with {variable}={value!r}:\n{text}"
            )
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    output = log_path.read_text(errors="replace").strip()
    assert process.returncode == 2, output
    assert len(output.splitlines()) == 1, output
    assert output.startswith("jobledger coordinator: "), output
    assert variable in output, output


async def test_worker_export_child_exits_with_the_worker(
    tmp_path: Path,
    tracing_env: pytest.MonkeyPatch,
    collector: TraceCollector,
    coordinators: list[CoordinatorProcess],
    reaper: Reaper,
) -> None:
    tracing_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    tracing_env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    coordinator, _ = await start_coordinator(tmp_path, coordinators, reaper)
    workers: list[asyncio.subprocess.Process] = []
    try:
        for name in ("tm-term", "tm-kill"):
            with (tmp_path / f"{name}.log").open("wb") as log:
                workers.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "tests.worker_helpers.run_worker",
                        "--coordinator",
                        coordinator.address,
                        "--state-dir",
                        str(tmp_path / name),
                        "--id",
                        name,
                        "--heartbeat-interval",
                        "0.2",
                        cwd=REPO_ROOT,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                    )
                )
        children = [reaper.track(await wait_child(w.pid)) for w in workers]
        # Worker spans (its RegisterTaskManager call) reach the collector.
        deadline = time.monotonic() + 30
        while not any(
            kv.value.string_value == "jobledger-worker"
            for request in collector.requests
            for rs in request.resource_spans
            for kv in rs.resource.attributes
        ):
            assert time.monotonic() < deadline, "no worker span arrived"
            await asyncio.sleep(0.1)
        workers[0].send_signal(signal.SIGTERM)
        workers[1].kill()
        assert await asyncio.wait_for(workers[0].wait(), 30) == 0
        assert await asyncio.wait_for(workers[1].wait(), 30) == -signal.SIGKILL
        for child in children:
            wait_gone(child)
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
