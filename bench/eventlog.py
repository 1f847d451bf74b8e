"""Measure durable appends and replay of the SQLite event log.

Run ``python -m bench.eventlog``, which took 50 s on the 2-core machine of
BENCHMARKS.md, or add ``--quick`` for a run of about 11 s there. Every case
writes the same serialized event, a TaskManagerHeartbeat with one
TaskMetricData, to its own SQLite file in a temporary folder, in WAL mode
with ``synchronous=FULL``:

- group commit: SqliteEventLog with 1, 16 and 256 writer tasks, each
  awaiting ``append([event], epoch)`` in a loop;
- naive: one aiosqlite connection shared by 16 writer tasks, which a lock
  serializes, with one INSERT and one commit per append;
- limit: Python's sqlite3 inserting pre-serialized rows with executemany,
  all in one transaction;
- replay: ``SqliteEventLog.read(1)`` over a full log, decoding included.

The cases run one after another in this process. Each reports the median of
a few timed repetitions after a warm-up. The last line of the output is one
JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite

from eventlog import SqliteEventLog, event_type
from protos import jobledger_events_pb2 as pb
from worker.cli import run_event_loop

GROUP_COMMIT_WRITERS = (1, 16, 256)
NAIVE_WRITERS = 16

# The shape of SqliteEventLog's events table, so that the naive and the
# limit cases store the same rows.
_EVENTS_TABLE = """
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch INTEGER NOT NULL,
    type TEXT NOT NULL,
    body BLOB NOT NULL
)
"""
_INSERT = "INSERT INTO events (epoch, type, body) VALUES (?, ?, ?)"

# Events per append while the replay log is filled: SqliteEventLog's default
# max_batch_events, so each append is one commit.
_FILL_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and durations of one benchmark run."""

    quick: bool
    run_s: float
    warmup_s: float
    repetitions: int
    limit_rows: int
    replay_events: int


FULL = Settings(
    quick=False,
    run_s=3.0,
    warmup_s=0.5,
    repetitions=3,
    limit_rows=200_000,
    replay_events=1_000_000,
)
QUICK = Settings(
    quick=True,
    run_s=0.6,
    warmup_s=0.2,
    repetitions=3,
    limit_rows=50_000,
    replay_events=200_000,
)


@dataclasses.dataclass(frozen=True)
class Rate:
    """The events per second of each timed repetition of one case."""

    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


def heartbeat_event() -> pb.Event:
    """Build the event every case writes.

    The timestamp is set, so SqliteEventLog stores the same bytes as the
    other cases instead of appending the current time.
    """
    event = pb.Event()
    event.timestamp.FromMilliseconds(1_700_000_000_000)
    heartbeat = event.task_manager_heartbeat
    heartbeat.task_manager_id = "tm-0001"
    heartbeat.registration_id = 1
    metric = heartbeat.task_metrics.add()
    metric.task_id = "map_3"
    metric.records_in = 1_234_567
    metric.records_out = 1_234_000
    metric.job_id = "job-000001"
    return event


# ------------------------------------------------------------ group commit


async def _append_until(
    log: SqliteEventLog, event: pb.Event, epoch: int, deadline: float
) -> int:
    appended = 0
    while time.perf_counter() < deadline:
        await log.append([event], epoch)
        appended += 1
    return appended


async def _timed_writers(
    writers: int, duration_s: float, write: Callable[[float], Awaitable[int]]
) -> tuple[int, float]:
    """Run ``writers`` tasks of ``write(deadline)`` and return (events, seconds).

    The time runs until the last writer returns, so it includes the commits
    still in flight at the deadline.
    """
    start = time.perf_counter()
    deadline = start + duration_s
    counts = await asyncio.gather(*(write(deadline) for _ in range(writers)))
    return sum(counts), time.perf_counter() - start


async def measure_group_commit(
    path: Path, writers: int, event: pb.Event, settings: Settings
) -> Rate:
    """Measure durable appends per second through SqliteEventLog."""
    async with SqliteEventLog(path) as log:
        lease = await log.acquire_lease("bench", "127.0.0.1:0", 3600.0)
        if lease is None:
            raise RuntimeError(f"the lease of the new log {path} is already held")

        def write(deadline: float) -> Awaitable[int]:
            return _append_until(log, event, lease.epoch, deadline)

        written, _ = await _timed_writers(writers, settings.warmup_s, write)
        runs = []
        for _ in range(settings.repetitions):
            events, seconds = await _timed_writers(writers, settings.run_s, write)
            written += events
            runs.append(events / seconds)

        # The lease took seq 1 for its LeaderElected event.
        last = await log.last_seq()
        if last != written + 1:
            raise RuntimeError(
                f"{path} ends at seq {last}, but {written} appends returned "
                f"after the LeaderElected event at seq 1"
            )
    return Rate(runs)


# ------------------------------------------------------------ naive


async def _connect_naive(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path)
    await conn.execute("PRAGMA journal_mode = WAL")
    await conn.execute("PRAGMA synchronous = FULL")
    await conn.execute(_EVENTS_TABLE)
    await conn.commit()
    return conn


async def measure_naive(path: Path, event: pb.Event, settings: Settings) -> Rate:
    """Measure one INSERT and one commit per append on a shared connection."""
    conn = await _connect_naive(path)
    lock = asyncio.Lock()
    type_name = event_type(event)

    async def write(deadline: float) -> int:
        appended = 0
        while time.perf_counter() < deadline:
            body = event.SerializeToString()
            async with lock:
                await conn.execute(_INSERT, (1, type_name, body))
                await conn.commit()
            appended += 1
        return appended

    try:
        written, _ = await _timed_writers(NAIVE_WRITERS, settings.warmup_s, write)
        runs = []
        for _ in range(settings.repetitions):
            events, seconds = await _timed_writers(NAIVE_WRITERS, settings.run_s, write)
            written += events
            runs.append(events / seconds)
        rows = await conn.execute_fetchall("SELECT count(*) FROM events")
        stored = next(iter(rows))[0]
    finally:
        await conn.close()
    if stored != written:
        raise RuntimeError(f"{path} stores {stored} rows, but {written} were appended")
    return Rate(runs)


# ------------------------------------------------------------ limit


def _insert_in_one_transaction(
    conn: sqlite3.Connection, rows: list[tuple[int, str, bytes]]
) -> float:
    start = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany(_INSERT, rows)
    conn.execute("COMMIT")
    return time.perf_counter() - start


def measure_limit(path: Path, event: pb.Event, settings: Settings) -> Rate:
    """Measure sqlite3 executemany of pre-serialized rows in one transaction."""
    row = (1, event_type(event), event.SerializeToString())
    rows = [row] * settings.limit_rows
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(_EVENTS_TABLE)
        _insert_in_one_transaction(conn, rows[: len(rows) // 10])
        runs = [
            len(rows) / _insert_in_one_transaction(conn, rows)
            for _ in range(settings.repetitions)
        ]
    finally:
        conn.close()
    return Rate(runs)


# ------------------------------------------------------------ replay


async def _fill(path: Path, event: pb.Event, count: int) -> None:
    async with SqliteEventLog(path) as log:
        lease = await log.acquire_lease("bench", "127.0.0.1:0", 3600.0)
        if lease is None:
            raise RuntimeError(f"the lease of the new log {path} is already held")
        remaining = count - 1  # The LeaderElected event is the first.
        while remaining > 0:
            batch = min(remaining, _FILL_BATCH)
            await log.append([event] * batch, lease.epoch)
            remaining -= batch


async def _read_all(log: SqliteEventLog) -> tuple[int, float]:
    start = time.perf_counter()
    count = 0
    async for _ in log.read(1):
        count += 1
    return count, time.perf_counter() - start


async def measure_replay(path: Path, event: pb.Event, settings: Settings) -> Rate:
    """Measure events per second of ``read(1)`` over a full log.

    The log is written first and opened again, as a restarted coordinator
    would. The warm-up read leaves the file in the OS page cache.
    """
    await _fill(path, event, settings.replay_events)
    async with SqliteEventLog(path) as log:
        await _read_all(log)
        runs = []
        for _ in range(settings.repetitions):
            count, seconds = await _read_all(log)
            if count != settings.replay_events:
                raise RuntimeError(
                    f"read(1) of {path} yielded {count} events, "
                    f"expected {settings.replay_events}"
                )
            runs.append(count / seconds)
    return Rate(runs)


# ------------------------------------------------------------ report


def cpu_count() -> int:
    """Return the CPUs this process may run on, as ``nproc`` prints them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def filesystem_type(path: Path) -> str:
    """Return the type of the file system that contains ``path``.

    Reads /proc/mounts, so it returns "unknown" outside Linux.
    """
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    best, best_type = "", "unknown"
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = resolved == mount_point or resolved.startswith(
            mount_point.rstrip("/") + "/"
        )
        if inside and len(mount_point) > len(best):
            best, best_type = mount_point, fields[2]
    return best_type


def _print_rate(case: str, rate: Rate) -> None:
    runs = ", ".join(f"{run:,.0f}" for run in rate.runs)
    print(f"{case + ':':<34}{rate.median:>10,.0f} events/s (median; runs {runs})")


def run(settings: Settings, parent: Path | None) -> dict[str, Any]:
    """Run every case in a new temporary folder and return the figures."""
    event = heartbeat_event()
    with tempfile.TemporaryDirectory(prefix="jobledger-bench-", dir=parent) as name:
        folder = Path(name)
        filesystem = filesystem_type(folder)
        mode = "quick" if settings.quick else "full"
        print(f"jobledger event log benchmark, {mode} run")
        print(
            f"machine: {cpu_count()} CPUs, Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}, files in {folder} ({filesystem})"
        )
        if filesystem in ("tmpfs", "ramfs"):
            print(f"note: {filesystem} keeps no data across a crash of the machine")
        print(
            f"event: TaskManagerHeartbeat with one TaskMetricData, "
            f"{len(event.SerializeToString())} bytes serialized; "
            f"{settings.repetitions} runs of {settings.run_s} s per case"
        )

        group_commit: dict[int, Rate] = {}
        for writers in GROUP_COMMIT_WRITERS:
            rate = run_event_loop(
                measure_group_commit(
                    folder / f"group-{writers}.db", writers, event, settings
                )
            )
            group_commit[writers] = rate
            _print_rate(f"group commit, {writers} writer(s)", rate)

        naive = run_event_loop(measure_naive(folder / "naive.db", event, settings))
        _print_rate(f"naive, {NAIVE_WRITERS} writers", naive)

        limit = measure_limit(folder / "limit.db", event, settings)
        _print_rate(f"limit, executemany of {settings.limit_rows:,}", limit)

        replay = run_event_loop(measure_replay(folder / "replay.db", event, settings))
        _print_rate(f"replay of {settings.replay_events:,} events", replay)

    ratio = group_commit[256].median / limit.median
    print(f"group commit with 256 writers / limit: {ratio:.3f}")
    return {
        "benchmark": "eventlog",
        "quick": settings.quick,
        "nproc": cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "filesystem": filesystem,
        "event_bytes": len(event.SerializeToString()),
        "repetitions": settings.repetitions,
        "run_seconds": settings.run_s,
        **{
            f"group_commit_{writers}_writers_events_per_s": round(rate.median)
            for writers, rate in group_commit.items()
        },
        f"naive_{NAIVE_WRITERS}_writers_events_per_s": round(naive.median),
        "limit_executemany_events_per_s": round(limit.median),
        "ratio_group_commit_256_to_limit": round(ratio, 3),
        "replay_events": settings.replay_events,
        "replay_events_per_s": round(replay.median),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.eventlog",
        description="Measure durable appends and replay of the SQLite event log.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="0.6 s runs in place of 3 s and a 200,000-event replay log in place "
        "of 1,000,000",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="folder in which the temporary SQLite files are created "
        "(default: the system's temporary folder); it must be on the disk "
        "to be measured",
    )
    args = parser.parse_args(argv)
    figures = run(QUICK if args.quick else FULL, args.dir)
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
