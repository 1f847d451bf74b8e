"""Registration and heartbeats: how a worker stays a member of the cluster."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from protos import jobledger_types_pb2 as types_pb
from protos import jobmanager_internal_pb2 as fpb
from worker.coordinator_client import CoordinatorClient
from worker.fencing import EpochFence

logger = logging.getLogger(__name__)


class Membership:
    """Registers the worker, then heartbeats every interval until stopped.

    Calls retry forever, with exponential backoff and jitter, while no
    coordinator is reachable. A heartbeat reply with acknowledged=false (the
    coordinator has no such registration) registers again with the
    same incarnation, which keeps the worker's tasks.
    """

    def __init__(
        self,
        client: CoordinatorClient,
        fence: EpochFence,
        registration: fpb.RegisterTaskManagerRequest,
        interval_s: float,
        running: Callable[
            [], tuple[list[fpb.TaskMetricData], list[types_pb.RunningTask]]
        ],
    ) -> None:
        self._client = client
        self._fence = fence
        self._registration = registration
        self._interval_s = interval_s
        self._running = running
        self.registered = asyncio.Event()
        self.registrations = 0
        self.job_manager_id = ""

    @property
    def task_manager_id(self) -> str:
        return self._registration.task_manager_id

    async def run(self) -> None:
        """Stay registered until cancelled."""
        while True:
            await self._register()
            acknowledged = True
            while acknowledged:
                await asyncio.sleep(self._interval_s)
                acknowledged = await self._heartbeat()
            self.registered.clear()
            logger.info(
                "task manager %s is unknown to coordinator %s; registering again",
                self.task_manager_id,
                self._client.current,
            )

    async def _register(self) -> None:
        while True:
            try:
                response = await self._client.call(
                    "RegisterTaskManager",
                    lambda stubs, timeout: stubs.registration.RegisterTaskManager(
                        self._registration, timeout=timeout
                    ),
                )
            except grpc.aio.AioRpcError as exc:
                # Only a rejection arrives here: the client retries the rest.
                logger.error(
                    "registration of task manager %s rejected by %s: %s: %s",
                    self.task_manager_id,
                    self._client.current,
                    exc.code().name,
                    exc.details(),
                )
                await asyncio.sleep(self._interval_s)
                continue
            break
        self._fence.observe(response.leader_epoch)
        self.job_manager_id = response.job_manager_id
        self.registrations += 1
        self.registered.set()
        logger.info(
            "task manager %s registered with %s (epoch %d, incarnation %d)",
            self.task_manager_id,
            response.job_manager_id,
            response.leader_epoch,
            self._registration.incarnation,
        )

    async def _heartbeat(self) -> bool:
        """Send one heartbeat; return False when the worker must register."""
        metrics, running = self._running()
        request = fpb.HeartbeatRequest(
            task_manager_id=self.task_manager_id,
            task_metrics=metrics,
            running_tasks=running,
            incarnation=self._registration.incarnation,
        )
        # A coordinator that is paused rather than dead accepts the connection
        # but never replies, so a heartbeat gives up after two intervals (at
        # least 1 s) and the client moves on to the next coordinator.
        timeout_s = max(1.0, 2 * self._interval_s)
        try:
            response = await self._client.call(
                "SendHeartbeat",
                lambda stubs, timeout: stubs.registration.SendHeartbeat(
                    request, timeout=min(timeout, timeout_s)
                ),
            )
        except grpc.aio.AioRpcError as exc:
            logger.warning(
                "heartbeat of task manager %s rejected: %s: %s",
                self.task_manager_id,
                exc.code().name,
                exc.details(),
            )
            return True
        # A new leader replies with its epoch before it calls this worker, so
        # the calls of the leader it deposed are rejected from now on.
        self._fence.observe(response.leader_epoch)
        return bool(response.acknowledged)
