"""Run a real coordinator as a subprocess on 127.0.0.1 and talk to it over gRPC.

``CoordinatorProcess`` starts ``jobledger coordinator`` on one log file and
one port, and can start it again after a kill, as an operator restarting a
crashed coordinator would. Every start writes the process's stdout and
stderr to its own file, so a failing test can show the coordinator's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc

from protos import jobledger_services_pb2 as svc
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2_grpc as fpb_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]

# gRPC waits 1 s before its first reconnection attempt by default, and longer
# after each failure. A coordinator that restarts in well under a second
# would then look slow to start.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 200),
)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that no socket is bound to right now.

    Another process may take the port before the caller binds it, so a
    start on it can still fail with "cannot listen".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def coordinator_command() -> list[str]:
    """Return the command that runs the ``jobledger`` console script.

    Uses the script installed next to this Python, or ``python -m
    coordinator.cli`` where the package was not installed with its scripts.
    """
    script = Path(sys.executable).with_name("jobledger")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "coordinator.cli"]


class CoordinatorProcess:
    """One coordinator configuration, started as a new process on each ``start``.

    ``args`` are extra ``jobledger coordinator`` options such as
    ``--max-concurrent-checkpoints 4``. The stubs talk to the process of the
    latest start over a new channel, so no call reaches a process that was
    killed. After a kill the stubs stay usable, and their calls fail with
    UNAVAILABLE until the next start.
    """

    def __init__(
        self, db: str | Path, port: int, log_dir: Path, args: Sequence[str] = ()
    ) -> None:
        self.db = str(db)
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.log_dir = log_dir
        self.args = list(args)
        self.starts = 0
        self.log_path: Path | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.channel: grpc.aio.Channel | None = None
        self._jm: fpb_grpc.JobManagerInternalServiceStub | None = None
        self._tm: fpb_grpc.TaskManagerRegistrationStub | None = None
        self._admin: svc_grpc.AdminServiceStub | None = None

    @property
    def jm(self) -> fpb_grpc.JobManagerInternalServiceStub:
        """JobManagerInternalService of the latest start."""
        self._check_channel()
        assert self._jm is not None
        return self._jm

    @property
    def tm(self) -> fpb_grpc.TaskManagerRegistrationStub:
        """TaskManagerRegistration of the latest start."""
        self._check_channel()
        assert self._tm is not None
        return self._tm

    @property
    def admin(self) -> svc_grpc.AdminServiceStub:
        """AdminService of the latest start."""
        self._check_channel()
        assert self._admin is not None
        return self._admin

    def _check_channel(self) -> None:
        if self.channel is None:
            raise RuntimeError(
                f"no channel to the coordinator on {self.address}: it was not "
                "started, or was stopped since"
            )

    async def start(self, timeout_s: float = 20.0) -> svc.Overview:
        """Start a new process and return its overview once it serves as leader."""
        await self.launch()
        return await self.wait_serving(timeout_s)

    async def launch(self) -> None:
        """Start a new process without waiting for it, e.g. as a standby."""
        if self.process is not None and self.process.returncode is None:
            raise RuntimeError(f"the coordinator on {self.address} is still running")
        self.starts += 1
        self.log_path = self.log_dir / f"coordinator-{self.port}-{self.starts}.log"
        command = [
            *coordinator_command(),
            "coordinator",
            "--db",
            self.db,
            "--listen",
            self.address,
            *self.args,
        ]
        with self.log_path.open("wb") as output:
            self.process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        await self._open_channel()

    async def _open_channel(self) -> None:
        await self._close_channel()
        self.channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self._jm = fpb_grpc.JobManagerInternalServiceStub(self.channel)
        self._tm = fpb_grpc.TaskManagerRegistrationStub(self.channel)
        self._admin = svc_grpc.AdminServiceStub(self.channel)

    async def _close_channel(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        self.channel = None

    async def wait_serving(self, timeout_s: float = 20.0) -> svc.Overview:
        """Return the overview once GetOverview succeeds, i.e. the process leads.

        A standby, and a leader still replaying the log, return UNAVAILABLE.
        Raises RuntimeError with the end of the log when the process exits
        first, and TimeoutError after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            self._raise_if_exited()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"the coordinator on {self.address} did not lead within "
                    f"{timeout_s} s; its log ends with:\n{self.log_tail()}"
                )
            try:
                overview: svc.Overview = await self.admin.GetOverview(
                    svc.GetOverviewRequest(),
                    timeout=min(remaining, 2.0),
                    wait_for_ready=True,
                )
                return overview
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
            await asyncio.sleep(0.02)

    def _raise_if_exited(self) -> None:
        if self.process is None:
            raise RuntimeError(f"the coordinator on {self.address} was never started")
        if self.process.returncode is not None:
            raise RuntimeError(
                f"the coordinator on {self.address} exited with status "
                f"{self.process.returncode}; its log ends with:\n{self.log_tail()}"
            )

    async def kill(self) -> int:
        """Kill the process with SIGKILL and return its exit status."""
        return await self._signal(signal.SIGKILL, 10.0)

    async def terminate(self, timeout_s: float = 10.0) -> int:
        """Stop the process with SIGTERM, as an operator would, and return its
        exit status. Kills it when it has not exited after ``timeout_s``."""
        return await self._signal(signal.SIGTERM, timeout_s)

    async def _signal(self, signum: int, timeout_s: float) -> int:
        process = self.process
        if process is None:
            raise RuntimeError(f"the coordinator on {self.address} was never started")
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
        try:
            return await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise

    async def close(self) -> None:
        """Kill the process if it still runs. Safe to call twice."""
        if self.process is not None and self.process.returncode is None:
            await self.kill()
        await self._close_channel()

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the latest start's log."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


@contextlib.asynccontextmanager
async def leading_coordinator(folder: Path) -> AsyncIterator[CoordinatorProcess]:
    """Start a coordinator on a new log in ``folder``; close it on exit.

    It listens on a free port of 127.0.0.1 and leads once this yields.
    """
    coordinator = CoordinatorProcess(folder / "log.db", free_port(), folder)
    try:
        await coordinator.start()
        yield coordinator
    finally:
        await coordinator.close()
