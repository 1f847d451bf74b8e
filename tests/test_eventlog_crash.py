"""Durability of the SQLite event log when its writer process is killed."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sqlite3
from pathlib import Path

from eventlog import SqliteEventLog
from protos import jobledger_events_pb2 as pb
from tests.helpers import AppendLoopOutput, parse_append_loop_output, start_append_loop
from tests.helpers.append_loop import payload_digest

RUNS = 5
HOLDER = "crash-writer"


async def run_until_killed(
    path: Path, seed: int, kill_after_s: float
) -> tuple[AppendLoopOutput, int]:
    """Run append_loop.py and SIGKILL it ``kill_after_s`` seconds after it leads."""
    process = await start_append_loop(path, "--holder", HOLDER, "--seed", str(seed))
    assert process.stdout is not None
    assert process.stderr is not None
    lines: list[bytes] = []
    ready = asyncio.Event()

    async def collect_stdout() -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            lines.append(line)
            if line.startswith(b"ready "):
                ready.set()

    collector = asyncio.create_task(collect_stdout())
    stderr_reader = asyncio.create_task(process.stderr.read())
    try:
        ready_or_exit = asyncio.create_task(ready.wait())
        await asyncio.wait(
            [ready_or_exit, collector], timeout=30, return_when=asyncio.FIRST_COMPLETED
        )
        ready_or_exit.cancel()
        if not ready.is_set():
            stderr = await asyncio.wait_for(stderr_reader, 5)
            raise AssertionError(f"append_loop.py never took the lease: {stderr!r}")
        await asyncio.sleep(kill_after_s)
        process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(process.wait(), 30)
        await asyncio.wait_for(collector, 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        stderr_reader.cancel()
        collector.cancel()
    assert process.returncode is not None
    return parse_append_loop_output(b"".join(lines)), process.returncode


async def test_sigkill_keeps_acknowledged_events(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    rng = random.SystemRandom()
    acked: dict[int, str] = {}
    acked_epoch: dict[int, int] = {}
    epochs = []
    for run in range(RUNS):
        kill_after_s = rng.uniform(0.2, 1.0)
        output, returncode = await run_until_killed(path, run, kill_after_s)

        # The loop runs for 30 s unless killed, so it must have died by the
        # signal, not exited on its own.
        assert returncode == -signal.SIGKILL
        assert output.epoch is not None
        epochs.append(output.epoch)
        reacked = sorted(set(acked) & set(output.acks))
        assert not reacked, f"run {run} acknowledged reused seqs {reacked[:5]}"
        acked.update(output.acks)
        acked_epoch.update(dict.fromkeys(output.acks, output.epoch))

    assert epochs == list(range(1, RUNS + 1))
    assert acked, "no run acknowledged an append before it was killed"

    async with SqliteEventLog(path) as log:
        # read() decodes every stored event, so a half-written one raises here.
        events = [event async for event in log.read()]
        last_seq = await log.last_seq()

        seqs = [event.seq for event in events]
        assert seqs == list(range(1, len(events) + 1))
        assert last_seq == len(events)
        for event in events:
            assert event.WhichOneof("body") is not None
        stored = {event.seq: event for event in events}
        missing = sorted(set(acked) - set(stored))
        assert not missing, f"acknowledged seqs lost: {missing[:10]}"
        changed = [
            seq
            for seq, digest in acked.items()
            if payload_digest(stored[seq]) != digest
        ]
        assert not changed, f"acknowledged seqs with other payloads: {changed[:10]}"
        wrong_epoch = [
            seq for seq, epoch in acked_epoch.items() if stored[seq].epoch != epoch
        ]
        assert not wrong_epoch, f"seqs stored with another epoch: {wrong_epoch[:10]}"
        elected = [
            event.leader_elected.epoch
            for event in events
            if event.HasField("leader_elected")
        ]
        assert elected == epochs

        # The log stays writable after the last kill: seqs continue.
        lease = await log.acquire_lease(HOLDER, "127.0.0.1:0", 30)
        assert lease is not None
        assert lease.epoch == RUNS + 1
        appended = pb.Event()
        appended.job_status_changed.job_id = "after-crashes"
        assert await log.append([appended], lease.epoch) == [last_seq + 2]

    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
