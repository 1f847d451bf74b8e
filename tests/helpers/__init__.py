"""Helpers shared by the event log tests: backends and the append subprocess."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

from eventlog import EventLog, MemoryEventLog, SqliteEventLog
from protos import jobledger_events_pb2 as pb

APPEND_LOOP = Path(__file__).with_name("append_loop.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ["sqlite", "memory"]


class LogFactory:
    """A source of handles on one event log of the given backend.

    For SQLite every handle is a new SqliteEventLog on the same file, as two
    coordinators would have. MemoryEventLog cannot be shared between
    instances, so every handle is the same instance.
    """

    def __init__(self, backend: str, path: Path) -> None:
        self.backend = backend
        self.path = path
        self._memory = MemoryEventLog()
        self._opened: list[EventLog] = []

    async def open(self, **sqlite_options: Any) -> EventLog:
        log: EventLog
        if self.backend == "sqlite":
            log = SqliteEventLog(self.path, **sqlite_options)
        else:
            log = self._memory
        await log.open()
        self._opened.append(log)
        return log

    async def close_all(self) -> None:
        for log in self._opened:
            await log.close()


def registered_event(task_manager_id: str, slots: int = 1) -> pb.Event:
    event = pb.Event()
    event.task_manager_registered.task_manager_id = task_manager_id
    event.task_manager_registered.address = "127.0.0.1"
    event.task_manager_registered.slots = slots
    return event


def lost_event(task_manager_id: str, reason: str) -> pb.Event:
    event = pb.Event()
    event.task_manager_lost.task_manager_id = task_manager_id
    event.task_manager_lost.reason = reason
    return event


async def read_all(log: EventLog, from_seq: int = 1) -> list[pb.Event]:
    return [event async for event in log.read(from_seq)]


@dataclasses.dataclass
class AppendLoopOutput:
    """What one append_loop.py run printed, complete lines only."""

    epoch: int | None = None
    acks: dict[int, str] = dataclasses.field(default_factory=dict)
    done: bool = False


def parse_append_loop_output(data: bytes) -> AppendLoopOutput:
    """Parse append_loop.py output, dropping a last line cut off by a kill."""
    output = AppendLoopOutput()
    lines = data.split(b"\n")
    # The piece after the last newline is empty, or a line the kill cut off.
    for line in lines[:-1]:
        fields = line.decode().split()
        if fields[0] == "ready":
            output.epoch = int(fields[1])
        elif fields[0] == "ack":
            seq = int(fields[1])
            if seq in output.acks:
                raise AssertionError(f"seq {seq} acknowledged twice")
            output.acks[seq] = fields[2]
        elif fields[0] == "done":
            output.done = True
        else:
            raise AssertionError(f"unexpected append_loop.py line: {line!r}")
    return output


async def start_append_loop(path: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(APPEND_LOOP),
        str(path),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )


async def run_append_loop(
    path: Path, *args: str, timeout_s: float = 60.0
) -> AppendLoopOutput:
    """Run append_loop.py to completion and return what it acknowledged."""
    process = await start_append_loop(path, *args)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise AssertionError(
            f"append_loop.py exited with {process.returncode}: {stderr.decode()}"
        )
    return parse_append_loop_output(stdout)
