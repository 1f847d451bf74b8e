"""A coordinator and workers as local subprocesses, for the demo and benchmarks.

Every process listens on 127.0.0.1 only and runs in the data folder, so the
relative paths of a job spec resolve there. The coordinator keeps its
SQLite log in ``<data>/log.db``, the workers share ``<data>/state`` (a task
restored on the other worker reads its snapshot there) and every process
writes its output to a file under ``<data>/logs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import grpc

from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2_grpc as fpb_grpc

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent

# gRPC waits a second before its first reconnection by default; a restarted
# coordinator is back well before that.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
)
HEARTBEAT_INTERVAL_S = 0.5
# A worker counts as lost after this long without a heartbeat. Generous,
# because a busy worker on a loaded machine may send its heartbeats late.
HEARTBEAT_TIMEOUT_S = 5.0
START_TIMEOUT_S = 30.0
LEASE_S = 10.0


class ClusterError(RuntimeError):
    """A process of the cluster did not start or exited; names its log."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    Another process may take it before the coordinator binds it; the start
    then fails and names the coordinator's log.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalCluster:
    """One coordinator and ``workers`` workers, each with ``slots`` slots.

    ``start`` returns once every worker is registered. ``stop`` ends every
    process it started (SIGTERM, then SIGKILL after a grace period) and is
    safe to call twice and after a failed start.
    """

    def __init__(
        self,
        data_dir: Path,
        checkpoint_interval_s: float,
        workers: int = 2,
        slots: int = 4,
    ) -> None:
        self.data_dir = data_dir
        self.checkpoint_interval_s = checkpoint_interval_s
        self.worker_count = workers
        self.slots = slots
        self.address = ""
        self.coordinator: asyncio.subprocess.Process | None = None
        self.workers: list[asyncio.subprocess.Process | None] = []
        self._starts = 0
        self._channel: grpc.aio.Channel | None = None
        self.jm: fpb_grpc.JobManagerInternalServiceStub
        self.admin: svc_grpc.AdminServiceStub

    # ------------------------------------------------------------ start

    async def start(self) -> None:
        """Start the coordinator and the workers; raise ClusterError."""
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.address = f"127.0.0.1:{free_port()}"
        self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self.jm = fpb_grpc.JobManagerInternalServiceStub(self._channel)
        self.admin = svc_grpc.AdminServiceStub(self._channel)
        await self.start_coordinator()
        for index in range(self.worker_count):
            self.workers.append(
                await self._spawn(self._worker_command(index), f"worker-{index + 1}")
            )
        await self.wait_workers(self.worker_count)

    async def start_coordinator(self) -> None:
        """Start a coordinator on the log and wait until it leads."""
        self._starts += 1
        command = [
            *_jobledger(),
            "coordinator",
            "--db",
            str(self.data_dir / "log.db"),
            "--listen",
            self.address,
            "--checkpoint-interval",
            str(self.checkpoint_interval_s),
            "--heartbeat-interval",
            str(HEARTBEAT_INTERVAL_S),
            "--heartbeat-timeout",
            str(HEARTBEAT_TIMEOUT_S),
            "--restart-strategy",
            "fixed-delay",
            "--restart-attempts",
            "20",
            "--restart-delay",
            "0.5",
            # A restarted coordinator has the same id, so it takes its own
            # lease back at once. The long lease keeps a coordinator that the
            # busy workers starve of CPU from losing its leadership.
            "--lease",
            str(LEASE_S),
        ]
        name = f"coordinator-{self._starts}"
        self.coordinator = await self._spawn(command, name)
        await self._wait_leading(name)

    def _worker_command(self, index: int) -> list[str]:
        return [
            *_jobledger(),
            "worker",
            "--coordinator",
            self.address,
            "--listen",
            "127.0.0.1:0",
            "--slots",
            str(self.slots),
            "--state-dir",
            str(self.data_dir / "state"),
            "--id",
            f"demo-worker-{index + 1}",
            "--heartbeat-interval",
            str(HEARTBEAT_INTERVAL_S),
        ]

    async def _spawn(self, command: list[str], name: str) -> asyncio.subprocess.Process:
        log_path = self.data_dir / "logs" / f"{name}.log"
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # The workers import the job's functions, which live in this source tree.
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
        )
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.data_dir,
                env=environment,
            )
        logger.debug("started %s (pid %d), log in %s", name, process.pid, log_path)
        return process

    async def _wait_leading(self, name: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.coordinator is None or self.coordinator.returncode is not None:
                break
            try:
                await self.admin.GetOverview(
                    svc.GetOverviewRequest(), timeout=2.0, wait_for_ready=True
                )
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
            await asyncio.sleep(0.05)
        raise ClusterError(
            f"the coordinator on {self.address} did not start to lead within "
            f"{START_TIMEOUT_S} s; see {self.data_dir / 'logs' / (name + '.log')}"
        )

    async def wait_workers(self, count: int) -> None:
        """Return once ``count`` task managers are alive; raise ClusterError."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await self.admin.ListTaskManagers(
                    svc.ListTaskManagersRequest(), timeout=2.0
                )
                alive = [
                    tm
                    for tm in reply.task_managers
                    if tm.task_manager.status == pb.TASK_MANAGER_ALIVE
                ]
                if len(alive) >= count:
                    return
            await asyncio.sleep(0.1)
        raise ClusterError(
            f"{count} workers did not register within {START_TIMEOUT_S} s; "
            f"see the worker logs in {self.data_dir / 'logs'}"
        )

    # ------------------------------------------------------------ faults

    def check_coordinator(self) -> None:
        """Raise ClusterError when the coordinator process has exited."""
        if self.coordinator is not None and self.coordinator.returncode is not None:
            raise ClusterError(
                f"the coordinator exited with status {self.coordinator.returncode}; "
                f"see {self.data_dir / 'logs' / f'coordinator-{self._starts}.log'}"
            )

    async def kill_worker(self, index: int) -> None:
        """SIGKILL worker ``index`` (from 0); it is not started again."""
        process = self.workers[index]
        if process is not None:
            await _kill(process)
            logger.info("killed worker %d (pid %d)", index + 1, process.pid)
        self.workers[index] = None

    async def kill_coordinator(self) -> None:
        """SIGKILL the coordinator; ``start_coordinator`` starts it again."""
        if self.coordinator is not None:
            await _kill(self.coordinator)
            logger.info("killed the coordinator (pid %d)", self.coordinator.pid)

    def cpu_seconds(self) -> dict[str, float]:
        """Return the CPU time (user + system) of each running process so far.

        Reads /proc, so it returns {} where there is none (not Linux).
        """
        named = [("coordinator", self.coordinator)] + [
            (f"worker-{index + 1}", process)
            for index, process in enumerate(self.workers)
        ]
        times = {}
        for name, process in named:
            if process is None or process.returncode is not None:
                continue
            seconds = _cpu_seconds(process.pid)
            if seconds is not None:
                times[name] = seconds
        return times

    # ------------------------------------------------------------ stop

    async def stop(self, grace_s: float = 10.0) -> None:
        """End every process that still runs. Safe to call twice."""
        processes = [p for p in [*self.workers, self.coordinator] if p is not None]
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), grace_s)
            except TimeoutError:
                await _kill(process)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    await process.wait()


def _cpu_seconds(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may hold
    # spaces: utime and stime are the 12th and 13th, in clock ticks.
    fields = stat.rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _jobledger() -> list[str]:
    """Return the command that runs the ``jobledger`` command line."""
    return [sys.executable, "-m", "coordinator.cli"]
