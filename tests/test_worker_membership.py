"""Registration, heartbeats, leader following and epoch fencing."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from coordinator.server import Coordinator
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2 as fpb
from tests.harness import Cluster, config
from tests.worker_helpers.fake_coordinator import FakeCoordinator
from worker.server import Worker, WorkerConfig


def make_worker(addresses: list[str], state_dir: Path, name: str = "tm") -> Worker:
    return Worker(
        WorkerConfig(
            coordinators=addresses,
            state_dir=str(state_dir),
            slots=3,
            task_manager_id=name,
            heartbeat_interval_s=0.05,
        )
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeCoordinator]:
    coordinator = FakeCoordinator(epoch=4)
    await coordinator.start()
    yield coordinator
    await coordinator.stop()


async def test_registers_with_incarnation(cluster: Cluster, tmp_path: Path) -> None:
    worker = make_worker([f"127.0.0.1:{cluster.coordinator.port}"], tmp_path)
    await worker.start()
    try:
        await worker.wait_registered()
        tm = cluster.state.task_managers["tm"]
        assert tm.incarnation == worker.config.incarnation
        assert tm.slots == 3
        assert tm.port == worker.port
        assert worker.fence.highest == cluster.state.epoch
        first = tm.last_heartbeat_ms
        await cluster.wait(lambda s: s.task_managers["tm"].last_heartbeat_ms > first)
    finally:
        await worker.stop()
        await worker.stop()


async def test_heartbeat_carries_incarnation(
    fake: FakeCoordinator, tmp_path: Path
) -> None:
    worker = make_worker([f"127.0.0.1:{fake.port}"], tmp_path)
    await worker.start()
    try:
        await fake.wait_for(lambda f: len(f.heartbeats) >= 2)
        heartbeat = fake.heartbeats[-1]
        assert heartbeat.task_manager_id == "tm"
        assert heartbeat.incarnation == worker.config.incarnation
        assert list(heartbeat.running_tasks) == []
    finally:
        await worker.stop()


async def test_reregisters_when_heartbeat_unknown(
    fake: FakeCoordinator, tmp_path: Path
) -> None:
    fake.unknown_heartbeats = 1
    worker = make_worker([f"127.0.0.1:{fake.port}"], tmp_path)
    await worker.start()
    try:
        await fake.wait_for(lambda f: len(f.registrations) >= 2)
        await fake.wait_for(lambda f: len(f.heartbeats) >= 3)
        incarnations = {r.incarnation for r in fake.registrations}
        assert incarnations == {worker.config.incarnation}
    finally:
        await worker.stop()


async def test_follows_leader_hint(fake: FakeCoordinator, tmp_path: Path) -> None:
    standby = FakeCoordinator(leader_address=f"127.0.0.1:{fake.port}")
    await standby.start()
    worker = make_worker([f"127.0.0.1:{standby.port}"], tmp_path)
    await worker.start()
    try:
        await worker.wait_registered()
        assert standby.rejected_calls >= 1
        assert [r.task_manager_id for r in fake.registrations] == ["tm"]
        assert worker.fence.highest == 4
    finally:
        await worker.stop()
        await standby.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_retries_until_coordinator_starts(tmp_path: Path) -> None:
    port = free_port()
    worker = make_worker([f"127.0.0.1:{port}"], tmp_path)
    await worker.start()
    coordinator = FakeCoordinator()
    try:
        await asyncio.sleep(0.3)
        assert worker.membership is not None
        assert not worker.membership.registered.is_set()
        await coordinator.start(port)
        await worker.wait_registered()
        assert len(coordinator.registrations) == 1
    finally:
        await worker.stop()
        await coordinator.stop()


async def test_tries_next_address(fake: FakeCoordinator, tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    worker = make_worker([dead, f"127.0.0.1:{fake.port}"], tmp_path)
    await worker.start()
    try:
        await worker.wait_registered()
        assert len(fake.registrations) == 1
    finally:
        await worker.stop()


async def test_rejects_lower_epoch(fake: FakeCoordinator, tmp_path: Path) -> None:
    worker = make_worker([f"127.0.0.1:{fake.port}"], tmp_path)
    await worker.start()
    try:
        await worker.wait_registered()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
            stub = svc_grpc.TaskManagerControlStub(channel)
            request = svc.CancelTaskRequest(job_id="j", job_vertex_id="v", attempt=1)
            reply = await stub.CancelTask(
                request, metadata=(("jobledger-leader-epoch", "6"),)
            )
            assert reply.canceled is False
            assert worker.fence.highest == 6
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.CancelTask(
                    request, metadata=(("jobledger-leader-epoch", "5"),)
                )
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "epoch 5 is stale" in (raised.value.details() or "")
            reply = await stub.CancelTask(request)
            assert reply.canceled is False
    finally:
        await worker.stop()


async def test_replaced_worker_registers_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    worker = make_worker([f"127.0.0.1:{cluster.coordinator.port}"], tmp_path)
    await worker.start()
    try:
        await worker.wait_registered()
        # A registration of unknown incarnation (0) replaces this one, so
        # the replies to this worker's heartbeats carry acknowledged=false.
        replacement = fpb.RegisterTaskManagerRequest(
            task_manager_id="tm", address="127.0.0.1", port=worker.port, slots=1
        )
        await cluster.tm.RegisterTaskManager(replacement)
        assert cluster.state.task_managers["tm"].incarnation == 0
        await cluster.wait(
            lambda s: s.task_managers["tm"].incarnation == worker.config.incarnation
        )
        assert cluster.state.task_managers["tm"].status == pb.TASK_MANAGER_ALIVE
        assert cluster.state.task_managers["tm"].slots == 3
    finally:
        await worker.stop()


async def test_follows_real_leader_change(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    leader = Coordinator(config(path))
    await leader.start()
    await leader.wait_until_leader()
    standby = Coordinator(config(path))
    await standby.start()
    # The standby comes first in the list, so the worker needs the hint.
    addresses = [f"127.0.0.1:{c.port}" for c in (standby, leader)]
    worker = make_worker(addresses, tmp_path / "state")
    await worker.start()
    try:
        await worker.wait_registered()
        assert worker.fence.highest == 1
        await leader.stop()
        await standby.wait_until_leader()
        assert standby.engine is not None
        engine = standby.engine

        def heartbeat_after_takeover() -> bool:
            tm = engine.state.task_managers.get("tm")
            return (
                tm is not None and tm.last_heartbeat_ms > engine.state.leader_since_ms
            )

        async with asyncio.timeout(10):
            while not heartbeat_after_takeover():
                await asyncio.sleep(0.02)
        assert engine.state.task_managers["tm"].status == pb.TASK_MANAGER_ALIVE
    finally:
        await worker.stop()
        await standby.stop()
        await leader.stop()
