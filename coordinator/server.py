"""The coordinator process: the log, the engine, the gRPC server, leadership."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator import jobs
from coordinator.config import CoordinatorConfig
from coordinator.engine import Engine
from coordinator.leader import Leadership
from coordinator.servicers import (
    AdminService,
    JobManagerInternalService,
    TaskManagerRegistration,
    TaskReporting,
)
from coordinator.workers import WorkerCalls
from eventlog import DEFAULT_COMMIT_DELAY_S, EventLog, MemoryEventLog, SqliteEventLog
from observability import instruments
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAMES = (
    fpb.DESCRIPTOR.services_by_name["JobManagerInternalService"].full_name,
    fpb.DESCRIPTOR.services_by_name["TaskManagerRegistration"].full_name,
    svc.DESCRIPTOR.services_by_name["AdminService"].full_name,
    svc.DESCRIPTOR.services_by_name["TaskReporting"].full_name,
)


MEMORY_LOG = ":memory:"


def open_log(db_path: str, commit_delay_s: float = DEFAULT_COMMIT_DELAY_S) -> EventLog:
    """Return the log at ``db_path``; ":memory:" is a log without durability,
    for benchmarks that measure what durability costs."""
    if db_path == MEMORY_LOG:
        return MemoryEventLog()
    return SqliteEventLog(db_path, commit_delay_s=commit_delay_s)


class Coordinator:
    """One coordinator process's parts, started and stopped together.

    ``start`` returns once the server listens; leadership is taken in the
    background. ``stop`` is idempotent.
    """

    def __init__(self, config: CoordinatorConfig, log: EventLog | None = None) -> None:
        self.config = config
        self.log = (
            log if log is not None else open_log(config.db_path, config.commit_delay_s)
        )
        self.port = 0
        self.address = ""
        self.engine: Engine | None = None
        self._server: grpc.aio.Server | None = None
        self._workers: WorkerCalls | None = None
        self._leadership: Leadership | None = None
        self._leading: asyncio.Task[None] | None = None
        self._health = health.aio.HealthServicer()
        self._stopped = False

    async def start(self) -> int:
        """Open the log, serve, and start taking part in leadership."""
        await self.log.open()
        # The servicers record the RPC spans (see servicers.rpc).
        # so_reuseport is off: with it, gRPC lets a second coordinator bind
        # the same port and the kernel splits the clients between the two.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        host = self.config.listen.rpartition(":")[0]
        try:
            self.port = server.add_insecure_port(self.config.listen)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.config.listen}: {exc}") from exc
        self.address = self.config.advertise or f"{host}:{self.port}"
        coordinator_id = self.config.coordinator_id or f"coordinator@{self.address}"
        engine = Engine(self.log, self.config, coordinator_id)
        workers = WorkerCalls(engine, self.config)
        engine.effect_sink = workers.submit
        self.engine, self._workers = engine, workers
        self._add_services(server, engine)
        await server.start()
        self._server = server
        self._leadership = Leadership(
            engine, self.log, workers, self.config, self.address
        )
        self._leading = asyncio.create_task(self._lead(), name="leadership")
        logger.info(
            "coordinator %s serving on %s with log %s",
            coordinator_id,
            self.address,
            self.config.db_path,
        )
        return self.port

    def _add_services(self, server: grpc.aio.Server, engine: Engine) -> None:
        fpb_grpc.add_JobManagerInternalServiceServicer_to_server(
            JobManagerInternalService(engine), server
        )
        fpb_grpc.add_TaskManagerRegistrationServicer_to_server(
            TaskManagerRegistration(engine), server
        )
        svc_grpc.add_AdminServiceServicer_to_server(
            AdminService(engine, self.log), server
        )
        svc_grpc.add_TaskReportingServicer_to_server(TaskReporting(engine), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

    async def _lead(self) -> None:
        assert self._leadership is not None
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        try:
            await self._leadership.run()
        except Exception:
            logger.exception("leadership failed; the coordinator stops serving")
            await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            raise

    def register_gauges(self) -> None:
        """Observe task managers and free slots while this coordinator leads."""

        def alive() -> list[tuple[float, dict[str, str]]]:
            engine = self.engine
            if engine is None or not engine.is_leader:
                return []
            count = sum(
                1
                for tm in engine.state.task_managers.values()
                if tm.status == pb.TASK_MANAGER_ALIVE
            )
            return [(count, {})]

        def free() -> list[tuple[float, dict[str, str]]]:
            engine = self.engine
            if engine is None or not engine.is_leader:
                return []
            slots = jobs.slots_free(engine.state)
            return [(sum(max(0, n) for n in slots.values()), {})]

        instruments.register_coordinator_gauges(alive, free)

    async def wait_until_leader(self, timeout_s: float = 10.0) -> None:
        """Return once this coordinator leads; raise TimeoutError otherwise."""
        async with asyncio.timeout(timeout_s):
            while self.engine is None or not self.engine.is_leader:
                if self._leading is not None and self._leading.done():
                    self._leading.result()
                    raise RuntimeError("leadership ended before it began")
                await asyncio.sleep(0.01)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Release the lease, stop serving and close the log. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        await self._health.enter_graceful_shutdown()
        if self._leadership is not None:
            self._leadership.stop()
            await self._leadership.release()
        if self._leading is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._leading, grace_s)
        if self._server is not None:
            await self._server.stop(grace_s)
        if self._workers is not None:
            await self._workers.close()
        await self.log.close()
        logger.info("coordinator on %s stopped", self.address)
