"""The worker (TaskManager) process: its gRPC server, membership and tasks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import grpc

import observability
from observability import instruments
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc
from worker.coordinator_client import CoordinatorClient
from worker.exchange import ChannelRegistry, DataExchange
from worker.fencing import EpochFence
from worker.membership import Membership
from worker.runtime import CoordinatorReporter, Runtime
from worker.servicers import TaskExecution, TaskManagerCheckpointing, TaskManagerControl
from worker.snapshots import SnapshotStore
from worker.task import TaskEnvironment

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything a worker process is started with."""

    coordinators: list[str]
    state_dir: str
    listen: str = "127.0.0.1:0"
    slots: int = 1
    # Defaults to "worker@HOST:PORT" once the port is known.
    task_manager_id: str | None = None
    heartbeat_interval_s: float = 10.0
    # Process start time in ns; a new process registers a higher one.
    incarnation: int = dataclasses.field(default_factory=time.time_ns)


class Worker:
    """One worker's parts, started and stopped together.

    ``start`` returns the port once the server listens; registration runs in
    the background (see ``registered``). ``stop`` is idempotent.
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.fence = EpochFence()
        self.port = 0
        self.endpoint = ""
        self.task_manager_id = ""
        self.runtime: Runtime | None = None
        self.membership: Membership | None = None
        self.exchange: DataExchange | None = None
        self._client = CoordinatorClient(config.coordinators)
        self._server: grpc.aio.Server | None = None
        self._membership_task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> int:
        """Listen, build the runtime, and start registering; return the port.

        Raises OSError when the listen address cannot be bound.
        """
        # so_reuseport is off: with it, a second worker binds the same port
        # and the kernel splits the coordinator's calls between the two.
        server = grpc.aio.server(
            interceptors=[self.fence, *observability.server_interceptors()],
            options=[("grpc.so_reuseport", 0)],
        )
        host = self._listen(server)
        self.runtime = self._build_runtime()
        self._add_services(server, self.runtime)
        await server.start()
        self._server = server

        self.membership = Membership(
            self._client,
            self.fence,
            self._registration(host),
            self.config.heartbeat_interval_s,
            self.runtime.running_report,
        )
        self._membership_task = asyncio.create_task(
            self.membership.run(), name="membership"
        )
        logger.info(
            "worker %s serving on %s with %d slots, state in %s",
            self.task_manager_id,
            self.endpoint,
            self.config.slots,
            self.config.state_dir,
        )
        return self.port

    def _listen(self, server: grpc.aio.Server) -> str:
        """Bind the listen address; return the host other processes dial."""
        try:
            self.port = server.add_insecure_port(self.config.listen)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.config.listen}: {exc}") from exc
        # NOTE: the listen host is what the worker registers, so a wildcard
        # such as 0.0.0.0 is not reachable from another host.
        host = self.config.listen.rpartition(":")[0]
        self.endpoint = f"{host}:{self.port}"
        self.task_manager_id = self.config.task_manager_id or f"worker@{self.endpoint}"
        return host

    def _build_runtime(self) -> Runtime:
        state_dir = Path(self.config.state_dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(
                f"state directory {state_dir} cannot be created: {exc.strerror}; "
                "give a writable --state-dir"
            ) from exc
        reporter = CoordinatorReporter(self._client, self.task_manager_id)
        environment = TaskEnvironment(
            task_manager_id=self.task_manager_id,
            endpoint=self.endpoint,
            channels=ChannelRegistry(),
            snapshots=SnapshotStore(state_dir),
            reporter=reporter,
        )
        return Runtime(environment, reporter)

    def _add_services(self, server: grpc.aio.Server, runtime: Runtime) -> None:
        fpb_grpc.add_TaskExecutionServicer_to_server(
            TaskExecution(runtime, self.task_manager_id), server
        )
        fpb_grpc.add_TaskManagerCheckpointingServicer_to_server(
            TaskManagerCheckpointing(runtime), server
        )
        svc_grpc.add_TaskManagerControlServicer_to_server(
            TaskManagerControl(runtime), server
        )
        self.exchange = DataExchange(runtime.environment.channels)
        fpb_grpc.add_DataExchangeServiceServicer_to_server(self.exchange, server)

    def _registration(self, host: str) -> fpb.RegisterTaskManagerRequest:
        return fpb.RegisterTaskManagerRequest(
            task_manager_id=self.task_manager_id,
            address=host,
            port=self.port,
            slots=self.config.slots,
            incarnation=self.config.incarnation,
        )

    def register_gauges(self) -> None:
        """Observe the records each running task read and wrote.

        The callbacks run on the metric reader's thread, so they only read
        a copy of the task table and never reap it.
        """

        def counts(outgoing: bool) -> list[tuple[float, dict[str, str]]]:
            if self.runtime is None:
                return []
            return [
                (
                    task.writer.records_out if outgoing else task.records_in,
                    {"jobledger.job.id": key.job_id, "jobledger.task.id": key.task_id},
                )
                for key, task in list(self.runtime.tasks.items())
            ]

        instruments.register_worker_gauges(lambda: counts(False), lambda: counts(True))

    async def wait_registered(self, timeout_s: float = 10.0) -> None:
        """Return once registered; raise TimeoutError otherwise."""
        assert self.membership is not None, "wait_registered before start"
        async with asyncio.timeout(timeout_s):
            await self.membership.registered.wait()

    async def stop(self, grace_s: float = 1.0) -> None:
        """Cancel the tasks, stop heartbeats and the server. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._membership_task is not None:
            self._membership_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._membership_task
        if self.runtime is not None:
            await self.runtime.stop()
        if self._server is not None:
            await self._server.stop(grace_s)
        await self._client.close()
        logger.info("worker %s stopped", self.task_manager_id)
