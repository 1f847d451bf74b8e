"""A worker killed with SIGKILL and restarted under a new id and port: the
coordinator declares the old registration lost as soon as a call to it is
refused, instead of waiting for the heartbeat timeout."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from tests.test_worker_network import (
    Network,
    finished,
    output_bytes,
    running_network,
)
from tests.worker_helpers.jobs import keyed_sum_graph, write_events

# The heartbeat timeout is far longer than the test may take, so only a
# refused call can end the killed worker's registration in time. The restart
# delay leaves that call time to fail on a loaded machine before the restart
# places tasks again.
COORDINATOR_ARGS = (
    "--checkpoint-interval",
    "0.1",
    "--heartbeat-interval",
    "0.2",
    "--heartbeat-timeout",
    "300",
    "--restart-strategy",
    "fixed-delay",
    "--restart-attempts",
    "30",
    "--restart-delay",
    "1.0",
    "--default-slots",
    "4",
)


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[Network]:
    async with running_network(tmp_path, COORDINATOR_ARGS) as started:
        yield started


async def task_manager(network: Network, tm_id: str) -> pb.TaskManagerState:
    reply = await network.coordinator.admin.ListTaskManagers(
        svc.ListTaskManagersRequest()
    )
    for summary in reply.task_managers:
        if summary.task_manager.task_manager_id == tm_id:
            return summary.task_manager
    raise AssertionError(f"task manager {tm_id} is not listed: {reply}")


async def test_killed_worker_restarted_under_new_id(
    network: Network, tmp_path: Path
) -> None:
    for name in ("tm-a", "tm-b"):
        await network.add_worker(name)
    write_events(tmp_path / "events.csv", 800)
    expected = await run_job(network, tmp_path, "calm")
    graph = keyed_sum_graph(
        tmp_path / "events.csv",
        tmp_path / "out",
        delay_ms=3,
        mode="append",
        source_parallelism=1,
    )
    job_id = await network.submit(graph)
    job = await network.wait_job(
        job_id, lambda j: j.latest_completed_checkpoint_id > 0, "a checkpoint"
    )
    victim = job.tasks["src_0"].task_manager_id
    killed = next(w for w in network.workers if w.name == victim)
    assert await killed.stop(signal.SIGKILL) == -signal.SIGKILL
    # The same host restarted: a new process on a new port, under a new id.
    await network.add_worker(f"{victim}-restarted")

    job = await network.wait_job(job_id, finished, "the recovered job to finish")

    assert job.restarts == 1, job
    assert output_bytes(tmp_path / "out", 2) == expected
    lost = await task_manager(network, victim)
    assert lost.status == pb.TASK_MANAGER_LOST
    assert "unreachable" in lost.lost_reason
    assert f"127.0.0.1:{lost.port}" in lost.lost_reason
    assert "heartbeat" not in lost.lost_reason
    placed = {t.task_manager_id for t in job.tasks.values()}
    assert victim not in placed


async def run_job(network: Network, tmp_path: Path, name: str) -> list[bytes]:
    """Run the append job once without failures; return each sink's output."""
    graph = keyed_sum_graph(
        tmp_path / "events.csv",
        tmp_path / name,
        delay_ms=3,
        mode="append",
        source_parallelism=1,
    )
    job_id = await network.submit(graph)
    await network.wait_job(job_id, finished, "the undisturbed job to finish")
    return output_bytes(tmp_path / name, 2)
