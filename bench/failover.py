"""Measure how long a standby coordinator takes to replace a killed leader.

Run ``python -m bench.failover``, or add ``--quick`` for fewer runs. Each
run starts two ``jobledger coordinator`` subprocesses on 127.0.0.1 on a new
SQLite log: the first leads and the second follows the log as a hot
standby. A client in this process registers task managers and keeps
sending heartbeats to the leader, so the log grows while the standby
follows it. After a random part of a renewal period the leader is killed
with SIGKILL, and the benchmark polls the standby with GetOverview, which
only a leader serves, every 10 ms. The figure of a run is the time from
the SIGKILL to the first successful GetOverview.

Runs are repeated with the lease at its default of 2 s and at 1 s, taking
turns, so drift on the machine affects both alike. The last line of the
output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from eventlog import SqliteEventLog
from protos import jobledger_services_pb2 as svc
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc

LEASES_S = (2.0, 1.0)
TARGET_LEASE_S = 1.0
TARGET_MEDIAN_S = 1.5
POLL_S = 0.01
START_TIMEOUT_S = 30.0
# gRPC's default reconnection backoff starts at 1 s, which would hide the
# moment the standby starts to serve.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 100),
)
TASK_MANAGERS = 4


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Coordinator:
    """One ``jobledger coordinator`` subprocess and a channel to it."""

    def __init__(self, db: Path, lease_s: float, log_path: Path) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.db = db
        self.lease_s = lease_s
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self.admin = svc_grpc.AdminServiceStub(self.channel)
        self.tm = fpb_grpc.TaskManagerRegistrationStub(self.channel)

    async def launch(self) -> None:
        command = [
            sys.executable,
            "-m",
            "coordinator.cli",
            "--log-level",
            "WARNING",
            "coordinator",
            "--db",
            str(self.db),
            "--listen",
            self.address,
            "--lease",
            str(self.lease_s),
        ]
        with self.log_path.open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )

    async def overview(self, timeout_s: float) -> svc.Overview | None:
        """Return the overview, or None while this coordinator does not lead."""
        try:
            reply: svc.Overview = await self.admin.GetOverview(
                svc.GetOverviewRequest(), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                return None
            raise
        return reply

    async def wait_leading(self) -> svc.Overview:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            overview = await self.overview(1.0)
            if overview is not None:
                return overview
            await asyncio.sleep(POLL_S)
        raise RuntimeError(f"{self.address} did not lead; see {self.log_path}")

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10.0)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        await self.channel.close()


async def register_task_managers(leader: Coordinator) -> None:
    for index in range(TASK_MANAGERS):
        await leader.tm.RegisterTaskManager(
            fpb.RegisterTaskManagerRequest(
                task_manager_id=f"tm-{index}",
                address="127.0.0.1",
                port=1,
                incarnation=1,
            ),
            timeout=5.0,
        )


async def heartbeat_loop(leader: Coordinator) -> None:
    """Send a heartbeat of every task manager every 50 ms until cancelled."""
    while True:
        for index in range(TASK_MANAGERS):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await leader.tm.SendHeartbeat(
                    fpb.HeartbeatRequest(task_manager_id=f"tm-{index}", incarnation=1),
                    timeout=1.0,
                )
        await asyncio.sleep(0.05)


async def wait_followed(leader: Coordinator, standby: Coordinator) -> int:
    """Wait until the leader's overview lists the standby; return its seq."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        overview = await leader.overview(1.0)
        if overview is not None:
            for entry in overview.standbys:
                if entry.address == standby.address and entry.followed_seq > 0:
                    return int(entry.followed_seq)
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the standby {standby.address} never reported its position")


async def wait_first_answer(standby: Coordinator) -> None:
    """Poll the standby every 10 ms until it serves as leader."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if await standby.overview(0.5) is not None:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the standby {standby.address} never took over")
        await asyncio.sleep(POLL_S)


async def election_ms(db: Path, epoch: int) -> int:
    """Return the timestamp of the LeaderElected event of ``epoch``."""
    log = SqliteEventLog(db)
    async with log:
        async for event in log.read():
            if (
                event.WhichOneof("body") == "leader_elected"
                and event.leader_elected.epoch == epoch
            ):
                return int(event.timestamp.ToMilliseconds())
    raise RuntimeError(f"no LeaderElected event of epoch {epoch} in {db}")


async def one_failover(folder: Path, lease_s: float, run: int) -> dict[str, float]:
    """Kill a leader once and time the standby's takeover."""
    db = folder / f"failover-{lease_s:g}-{run}.db"
    log_path = folder / f"failover-{lease_s:g}-{run}.log"
    leader = Coordinator(db, lease_s, log_path)
    standby = Coordinator(db, lease_s, log_path)
    beats: asyncio.Task[None] | None = None
    try:
        await leader.launch()
        await leader.wait_leading()
        await standby.launch()
        await register_task_managers(leader)
        beats = asyncio.create_task(heartbeat_loop(leader))
        await wait_followed(leader, standby)
        # Kill at a random moment of the renewal cycle.
        await asyncio.sleep(random.uniform(0, lease_s / 3) + lease_s / 3)
        assert leader.process is not None
        killed_ms = time.time_ns() // 1_000_000
        started = time.perf_counter()
        leader.process.send_signal(signal.SIGKILL)
        await wait_first_answer(standby)
        answered_s = time.perf_counter() - started
    finally:
        if beats is not None:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
        await leader.close()
        await standby.close()
    elected_s = (await election_ms(db, 2) - killed_ms) / 1000
    return {"answered_s": answered_s, "lease_taken_s": elected_s}


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
        "min": round(min(values), 3),
    }


async def run(runs: int, folder: Path) -> dict[str, Any]:
    results: dict[float, list[dict[str, float]]] = {lease: [] for lease in LEASES_S}
    for index in range(runs):
        for lease_s in LEASES_S:
            result = await one_failover(folder, lease_s, index)
            results[lease_s].append(result)
            print(
                f"lease {lease_s:g} s, run {index + 1}: first answer after "
                f"{result['answered_s']:.3f} s, lease taken after "
                f"{result['lease_taken_s']:.3f} s",
                flush=True,
            )
    figures: dict[str, Any] = {"benchmark": "failover", "runs": runs}
    for lease_s, measured in results.items():
        answered = summary([r["answered_s"] for r in measured])
        taken = summary([r["lease_taken_s"] for r in measured])
        key = f"lease_{lease_s:g}s"
        figures[f"{key}_answered_median_s"] = answered["median"]
        figures[f"{key}_answered_max_s"] = answered["max"]
        figures[f"{key}_answered_min_s"] = answered["min"]
        figures[f"{key}_lease_taken_median_s"] = taken["median"]
        figures[f"{key}_lease_taken_max_s"] = taken["max"]
    target = figures[f"lease_{TARGET_LEASE_S:g}s_answered_median_s"]
    figures["target_median_s"] = TARGET_MEDIAN_S
    figures["target_met"] = target < TARGET_MEDIAN_S
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.failover",
        description="Measure the time from killing the leader coordinator to "
        "the first RPC a standby answers as the new leader.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 runs per lease in place of 10"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="folder for the temporary logs (default: the system's temporary "
        "folder); it must be on a local disk",
    )
    args = parser.parse_args(argv)
    runs = 3 if args.quick else 10
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(
        prefix="jobledger-failover-", dir=args.dir
    ) as name:
        print(
            f"jobledger failover benchmark, {runs} runs per lease, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
            flush=True,
        )
        figures = asyncio.run(run(runs, Path(name)))
    load_after = os.getloadavg()
    figures["quick"] = args.quick
    figures["load_average_1min_before"] = round(load_before[0], 2)
    figures["load_average_1min_after"] = round(load_after[0], 2)
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
