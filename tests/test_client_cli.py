"""The client commands of the ``jobledger`` console script, run as subprocesses
against a real coordinator and real workers, and their errors."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import signal
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.coordinator_process import (
    REPO_ROOT,
    CoordinatorProcess,
    coordinator_command,
    free_port,
    leading_coordinator,
)
from tests.worker_helpers.jobs import write_events

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


@dataclasses.dataclass
class Result:
    """What one run of the console script printed, and its exit status."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.code == 0, self.stderr
        return json.loads(self.stdout)

    def error_line(self) -> str:
        """Return the single line on standard error of a failed run."""
        assert self.code != 0, self.stdout
        assert "Traceback" not in self.stderr
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, self.stderr
        return lines[0]


async def run_cli(*args: str, timeout: float = 60.0) -> Result:
    process = await asyncio.create_subprocess_exec(
        *coordinator_command(),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


async def poll_json(
    predicate: Callable[[Any], bool], *args: str, timeout: float = 60.0
) -> Any:
    """Run a ``--json`` command until ``predicate`` holds for its output."""
    deadline = time.monotonic() + timeout
    while True:
        data = (await run_cli(*args, "--json")).json()
        if predicate(data):
            return data
        if time.monotonic() > deadline:
            raise TimeoutError(f"`jobledger {' '.join(args)}` still prints {data}")
        await asyncio.sleep(0.2)


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[CoordinatorProcess]:
    async with leading_coordinator(tmp_path) as process:
        yield process


class Workers:
    """Worker processes started with the ``jobledger worker`` command."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.processes: list[asyncio.subprocess.Process] = []

    async def start(self, coordinator: CoordinatorProcess, name: str) -> None:
        log = (self.state_dir / f"{name}.log").open("wb")
        with log:
            process = await asyncio.create_subprocess_exec(
                *coordinator_command(),
                "worker",
                "--coordinator",
                coordinator.address,
                "--listen",
                "127.0.0.1:0",
                "--slots",
                "4",
                "--state-dir",
                str(self.state_dir / name),
                "--id",
                name,
                "--heartbeat-interval",
                "0.2",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=REPO_ROOT,
            )
        self.processes.append(process)

    async def kill_all(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGKILL)
                await process.wait()


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[Workers]:
    started = Workers(tmp_path)
    try:
        yield started
    finally:
        await started.kill_all()


def keyed_sum_spec(source: Path, output: Path, delay_ms: float) -> dict[str, Any]:
    """Return the spec of source -> HASH by user -> rolling sum -> file sink."""
    return {
        "name": "keyed-sum",
        "vertices": [
            {
                "id": "src",
                "type": "source",
                "operator": "jobledger.source.csv",
                "config": {
                    "path": str(source),
                    "timestamp_field": "ts",
                    "types": {"amount": "int", "ts": "int"},
                    "delay_ms": delay_ms,
                },
            },
            {
                "id": "sum",
                "type": "operator",
                "parallelism": 2,
                "operator": "jobledger.aggregate",
                "config": {"aggregate": "sum", "field": "amount"},
            },
            {
                "id": "sink",
                "type": "sink",
                "parallelism": 2,
                "operator": "jobledger.sink.file",
                "config": {
                    "path": f"{output}-{{subtask}}",
                    "mode": "upsert",
                    "key": "key",
                },
            },
        ],
        "edges": [
            {"from": "src", "to": "sum", "shuffle": "hash", "key": "user"},
            {"from": "sum", "to": "sink", "shuffle": "forward"},
        ],
    }


def write_spec(path: Path, spec: object) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


async def submit_running_job(
    tmp_path: Path, coordinator: CoordinatorProcess, workers: Workers
) -> str:
    """Start two workers and submit a slow keyed-sum job; return its id once
    every task runs."""
    address = coordinator.address
    for name in ("tm-a", "tm-b"):
        await workers.start(coordinator, name)
    await poll_json(lambda tms: len(tms) == 2, "taskmanagers", "--coordinator", address)
    write_events(tmp_path / "events.csv", 20_000)
    spec = keyed_sum_spec(tmp_path / "events.csv", tmp_path / "out", delay_ms=2)
    submitted = await run_cli(
        "submit", str(write_spec(tmp_path / "job.yaml", spec)), "--coordinator", address
    )
    assert submitted.code == 0, submitted.stderr
    assert submitted.stdout.startswith("job ")
    assert submitted.stdout.rstrip().endswith("submitted (keyed-sum)")
    job_id = submitted.stdout.split()[1]
    await poll_json(
        lambda job: all(task["status"] == "RUNNING" for task in job["tasks"]),
        "job",
        job_id,
        "--coordinator",
        address,
    )
    return job_id


# ------------------------------------------------------------------ commands


async def test_jobs_and_job_tables(
    tmp_path: Path, coordinator: CoordinatorProcess, workers: Workers
) -> None:
    job_id = await submit_running_job(tmp_path, coordinator, workers)
    address = coordinator.address

    jobs = await run_cli("jobs", "--coordinator", address)
    assert jobs.code == 0, jobs.stderr
    header, row = jobs.stdout.splitlines()
    assert header.split() == [
        "JOB",
        "NAME",
        "STATUS",
        "TASKS",
        "RESTARTS",
        "CHECKPOINT",
        "SUBMITTED",
    ]
    assert row.split()[:6] == [job_id, "keyed-sum", "RUNNING", "5/5", "running", "0"]

    job = await run_cli("job", job_id, "--coordinator", address)
    assert job.code == 0, job.stderr
    lines = job.stdout.splitlines()
    assert lines[0].split() == ["job:", job_id]
    assert lines[1].split() == ["name:", "keyed-sum"]
    assert lines[2].split() == ["status:", "RUNNING"]
    task_rows = lines[lines.index("") + 2 :]
    assert [line.split()[0] for line in task_rows] == [
        "sink_0",
        "sink_1",
        "src_0",
        "sum_0",
        "sum_1",
    ]
    assert all(line.split()[1] == "RUNNING" for line in task_rows)
    assert {line.split()[3] for line in task_rows} <= {"tm-a", "tm-b"}


async def test_jobs_json_matches_job_json(
    tmp_path: Path, coordinator: CoordinatorProcess, workers: Workers
) -> None:
    job_id = await submit_running_job(tmp_path, coordinator, workers)
    address = coordinator.address

    (summary,) = (await run_cli("jobs", "--coordinator", address, "--json")).json()
    detail = (await run_cli("job", job_id, "--coordinator", address, "--json")).json()

    assert summary["job_id"] == job_id
    assert summary["job_name"] == "keyed-sum"
    assert summary["status"] == "RUNNING"
    assert summary["tasks"] == 5
    assert isinstance(summary["submitted_ms"], int)
    assert detail["job_id"] == job_id
    assert detail["submitted_ms"] == summary["submitted_ms"]
    assert [task["task_id"] for task in detail["tasks"]] == [
        "sink_0",
        "sink_1",
        "src_0",
        "sum_0",
        "sum_1",
    ]
    assert [v["id"] for v in detail["graph"]["vertices"]] == ["src", "sum", "sink"]
    edge = detail["graph"]["edges"][0]
    assert edge["shuffle_mode"] == "HASH"
    assert edge["output_keying_config"] == {"key_selector_type_name": "user"}


async def test_taskmanagers_table_and_json(
    coordinator: CoordinatorProcess, workers: Workers
) -> None:
    address = coordinator.address
    empty = await run_cli("taskmanagers", "--coordinator", address)
    assert empty.code == 0, empty.stderr
    assert empty.stdout.strip() == "no task managers"
    for name in ("tm-a", "tm-b"):
        await workers.start(coordinator, name)

    managers = await poll_json(
        lambda tms: len(tms) == 2, "taskmanagers", "--coordinator", address
    )
    table = await run_cli("taskmanagers", "--coordinator", address)

    assert [m["task_manager_id"] for m in managers] == ["tm-a", "tm-b"]
    assert all(m["status"] == "ALIVE" for m in managers)
    assert all(m["slots"] == 4 and m["slots_free"] == 4 for m in managers)
    assert all(m["address"].startswith("127.0.0.1:") for m in managers)
    header, *rows = table.stdout.splitlines()
    assert header.split()[:4] == ["TASK", "MANAGER", "ADDRESS", "STATUS"]
    assert [row.split()[:5] for row in rows] == [
        ["tm-a", managers[0]["address"], "ALIVE", "4", "4"],
        ["tm-b", managers[1]["address"], "ALIVE", "4", "4"],
    ]


async def test_checkpoint_recover_cancel(
    tmp_path: Path, coordinator: CoordinatorProcess, workers: Workers
) -> None:
    job_id = await submit_running_job(tmp_path, coordinator, workers)
    remote = ("--coordinator", coordinator.address)
    none = await run_cli("checkpoints", job_id, *remote)
    assert none.stdout.strip() == "no checkpoints"

    triggered = await run_cli("checkpoint", job_id, *remote)
    assert triggered.code == 0, triggered.stderr
    first_id = int(triggered.stdout.split()[1])
    assert (
        triggered.stdout.strip() == f"checkpoint {first_id} of job {job_id} triggered"
    )
    # One checkpoint may be pending at a time, the coordinator's default.
    await poll_json(
        lambda cps: cps[0]["status"] != "PENDING", "checkpoints", job_id, *remote
    )
    waited = await run_cli("checkpoint", job_id, *remote, "--wait", "60", "--json")
    completed = waited.json()
    checkpoint_id = completed["checkpoint_id"]
    assert checkpoint_id > first_id
    assert completed["job_id"] == job_id
    assert completed["status"] == "COMPLETED"
    assert completed["acknowledged_tasks"] == completed["total_tasks"] == 5
    checkpoints = (await run_cli("checkpoints", job_id, *remote, "--json")).json()
    assert [c["checkpoint_id"] for c in checkpoints] == [first_id, checkpoint_id]
    assert checkpoints[1] == {k: v for k, v in completed.items() if k != "job_id"}
    table = await run_cli("checkpoints", job_id, *remote)
    header, *rows = table.stdout.splitlines()
    assert header.split() == [
        "ID",
        "STATUS",
        "TRIGGERED",
        "DURATION",
        "SIZE",
        "ACKED",
        "FAILURE",
    ]
    row = rows[1].split()
    assert row[:2] == [str(checkpoint_id), "COMPLETED"]
    assert row[-2:] == ["5/5", "-"]

    recovered = await run_cli(
        "recover", job_id, "--checkpoint", str(checkpoint_id), *remote
    )
    assert recovered.code == 0, recovered.stderr
    assert recovered.stdout.strip() == (
        f"job {job_id} recovering from checkpoint {checkpoint_id}"
    )
    job = await poll_json(
        lambda j: j["restarts"] == 1 and j["status"] == "RUNNING",
        "job",
        job_id,
        *remote,
    )
    assert job["restore_checkpoint_id"] == checkpoint_id

    canceled = await run_cli("cancel", job_id, *remote)
    assert canceled.code == 0, canceled.stderr
    assert canceled.stdout.strip() == f"job {job_id} CANCELED"
    (summary,) = (await run_cli("jobs", *remote, "--json")).json()
    assert summary["status"] == "CANCELED"
    again = (await run_cli("cancel", job_id, *remote, "--json")).json()
    assert again == {"job_id": job_id, "status": "CANCELED"}


async def test_events_and_replay_of_live_log(
    tmp_path: Path, coordinator: CoordinatorProcess, workers: Workers
) -> None:
    job_id = await submit_running_job(tmp_path, coordinator, workers)
    remote = ("--coordinator", coordinator.address)
    await run_cli("cancel", job_id, *remote)
    live = await poll_json(lambda jobs: jobs[0]["tasks_running"] == 0, "jobs", *remote)

    events = await run_cli("events", "--db", coordinator.db)
    replayed = (await run_cli("replay", "--db", coordinator.db, "--json")).json()
    table = await run_cli("replay", "--db", coordinator.db)

    assert events.code == 0, events.stderr
    header, *rows = events.stdout.splitlines()
    assert header.split() == ["SEQ", "EPOCH", "TIME", "TYPE", "DETAILS"]
    assert [int(row.split()[0]) for row in rows] == list(range(1, len(rows) + 1))
    types = [row.split()[4] for row in rows]
    assert types[0] == "leader_elected"
    assert "task_manager_registered" in types
    assert "job_submitted" in types
    submitted = rows[types.index("job_submitted")]
    assert f"job_id={job_id} job_name=keyed-sum" in submitted
    assert replayed["jobs"] == live
    assert replayed["applied_seq"] >= len(rows)
    assert [m["task_manager_id"] for m in replayed["task_managers"]] == ["tm-a", "tm-b"]
    assert replayed["epoch"] == 1
    assert table.code == 0, table.stderr
    assert table.stdout.startswith(f"log {coordinator.db}: snapshot at seq -, ")
    assert f"{job_id}  keyed-sum  CANCELED" in table.stdout


async def test_events_json_from_seq(coordinator: CoordinatorProcess) -> None:
    await submit_waiting_job(coordinator, Path(coordinator.log_dir))

    all_events = await run_cli("events", "--db", coordinator.db, "--json")
    later = await run_cli("events", "--db", coordinator.db, "--from", "2", "--json")

    lines = [json.loads(line) for line in all_events.stdout.splitlines()]
    assert [event["seq"] for event in lines] == [1, 2]
    assert lines[0]["type"] == "leader_elected"
    assert lines[0]["body"]["address"] == coordinator.address
    assert lines[1]["type"] == "job_submitted"
    assert lines[1]["body"]["graph"]["job_name"] == "keyed-sum"
    assert [json.loads(line) for line in later.stdout.splitlines()] == lines[1:]


async def submit_waiting_job(coordinator: CoordinatorProcess, folder: Path) -> str:
    """Submit the keyed-sum job to a coordinator without workers; it waits
    for slots in CREATED. Return its id."""
    spec = keyed_sum_spec(folder / "events.csv", folder / "out", delay_ms=0)
    path = folder / "job.json"
    path.write_text(json.dumps(spec))
    result = await run_cli(
        "submit", str(path), "--coordinator", coordinator.address, "--json"
    )
    reply = result.json()
    assert reply["job_name"] == "keyed-sum"
    return str(reply["job_id"])


async def test_events_follow_prints_new(coordinator: CoordinatorProcess) -> None:
    follower = await asyncio.create_subprocess_exec(
        *coordinator_command(),
        "events",
        "--db",
        coordinator.db,
        "--follow",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert follower.stdout is not None
        first = json.loads(await asyncio.wait_for(follower.stdout.readline(), 30))
        assert first["type"] == "leader_elected"
        job_id = await submit_waiting_job(coordinator, Path(coordinator.log_dir))
        second = json.loads(await asyncio.wait_for(follower.stdout.readline(), 30))
        assert second["seq"] == 2
        assert second["type"] == "job_submitted"
        assert second["body"]["job_id"] == job_id
        follower.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(follower.communicate(), 30)
        assert follower.returncode == 130
        assert b"Traceback" not in stderr
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()


async def test_events_follow_table(coordinator: CoordinatorProcess) -> None:
    follower = await asyncio.create_subprocess_exec(
        *coordinator_command(),
        "events",
        "--db",
        coordinator.db,
        "--follow",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert follower.stdout is not None
        header = await asyncio.wait_for(follower.stdout.readline(), 30)
        first = await asyncio.wait_for(follower.stdout.readline(), 30)
        assert header.decode().split() == ["SEQ", "EPOCH", "TIME", "TYPE", "DETAILS"]
        cells = first.decode().split()
        assert cells[:2] == ["1", "1"]
        assert cells[4] == "leader_elected"
        assert f"address={coordinator.address}" in cells
    finally:
        follower.kill()
        await follower.wait()


async def test_log_commands_never_write(coordinator: CoordinatorProcess) -> None:
    await submit_waiting_job(coordinator, Path(coordinator.log_dir))
    await coordinator.kill()
    db = Path(coordinator.db)
    # The -shm file is the WAL index that every reader updates; the log's
    # content is in the database file and the WAL.
    files = [db, db.with_name("log.db-wal")]
    before = [digest(path) for path in files]

    events = await run_cli("events", "--db", str(db))
    replay = await run_cli("replay", "--db", str(db), "--json")

    assert events.code == 0, events.stderr
    assert replay.code == 0, replay.stderr
    assert [digest(path) for path in files] == before
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        (holder,) = conn.execute("SELECT holder FROM lease").fetchone()
        (count,) = conn.execute("SELECT count(*) FROM events").fetchone()
    assert holder.startswith("coordinator@")
    assert count == 2


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_standby_follows_leader(
    tmp_path: Path, coordinator: CoordinatorProcess
) -> None:
    standby = CoordinatorProcess(coordinator.db, free_port(), tmp_path)
    try:
        # A standby never serves as leader, so it never passes wait_serving.
        with pytest.raises(TimeoutError):
            await standby.start(timeout_s=3)
        await submit_waiting_job(coordinator, tmp_path)

        # Until its server is up, the standby refuses connections.
        deadline = time.monotonic() + 60
        while True:
            via_standby = await run_cli(
                "--log-level",
                "DEBUG",
                "jobs",
                "--coordinator",
                standby.address,
                "--json",
            )
            if via_standby.code != EXIT_UNREACHABLE or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        dead = f"127.0.0.1:{free_port()}"
        via_list = await run_cli(
            "jobs", "--coordinator", f"{dead},{standby.address}", "--json"
        )

        assert [job["job_name"] for job in via_standby.json()] == ["keyed-sum"]
        assert (
            f"ListJobs: following leader {coordinator.address} from {standby.address}"
            in via_standby.stderr
        )
        assert via_list.json() == via_standby.json()
    finally:
        await standby.close()


async def test_replay_with_snapshot(tmp_path: Path) -> None:
    coordinator = CoordinatorProcess(
        tmp_path / "log.db", free_port(), tmp_path, args=["--snapshot-every", "2"]
    )
    await coordinator.start()
    try:
        job_ids = [await submit_waiting_job(coordinator, tmp_path) for _ in range(3)]
        live = (
            await run_cli("jobs", "--coordinator", coordinator.address, "--json")
        ).json()
        replayed = await poll_json(
            lambda state: state["snapshot_seq"] >= 3,
            "replay",
            "--db",
            coordinator.db,
        )
    finally:
        await coordinator.close()

    assert replayed["applied_seq"] == 4
    assert replayed["events_applied"] == 4 - replayed["snapshot_seq"]
    assert [job["job_id"] for job in replayed["jobs"]] == job_ids
    assert replayed["jobs"] == live


async def test_events_after_compaction(tmp_path: Path) -> None:
    coordinator = CoordinatorProcess(
        tmp_path / "log.db",
        free_port(),
        tmp_path,
        args=["--snapshot-every", "2", "--retain-events", "0"],
    )
    await coordinator.start()
    try:
        for _ in range(3):
            await submit_waiting_job(coordinator, tmp_path)
        deadline = time.monotonic() + 60
        while True:
            kept = await run_cli("events", "--db", coordinator.db, "--json")
            seqs = [json.loads(line)["seq"] for line in kept.stdout.splitlines()]
            if seqs[:1] != [1] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        compacted = await run_cli("events", "--db", coordinator.db, "--from", "1")
        replayed = (await run_cli("replay", "--db", coordinator.db, "--json")).json()
    finally:
        await coordinator.close()

    assert kept.code == 0, kept.stderr
    assert seqs and seqs[0] > 1
    assert seqs == list(range(seqs[0], 5))
    assert compacted.code == EXIT_FAILED
    line = compacted.error_line()
    assert f"events up to seq {seqs[0] - 1} were compacted away" in line
    assert f"use --from {seqs[0]} or later" in line
    assert replayed["snapshot_seq"] >= seqs[0] - 1
    assert replayed["applied_seq"] == 4
    assert len(replayed["jobs"]) == 3


# ------------------------------------------------------------------ errors


async def test_unreachable_coordinator() -> None:
    address = f"127.0.0.1:{free_port()}"

    result = await run_cli("jobs", "--coordinator", address)

    assert result.code == EXIT_UNREACHABLE
    line = result.error_line()
    assert line.startswith("jobledger jobs: no leading coordinator reachable")
    assert f"{address}: connection refused" in line
    assert "--coordinator HOST:PORT" in line


async def test_silent_server_times_out() -> None:
    # A socket that accepts connections but never speaks gRPC.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"

        result = await run_cli("jobs", "--coordinator", address, "--timeout", "1")

    assert result.code == EXIT_UNREACHABLE
    assert result.error_line() == (
        f"jobledger jobs: ListJobs on {address} got no reply within 1 s; check that "
        f"{address} is a jobledger coordinator, or raise --timeout"
    )


async def test_unreachable_on_submit(tmp_path: Path) -> None:
    spec = keyed_sum_spec(tmp_path / "events.csv", tmp_path / "out", delay_ms=0)
    path = write_spec(tmp_path / "job.yaml", spec)

    result = await run_cli(
        "submit", str(path), "--coordinator", f"127.0.0.1:{free_port()}"
    )

    assert result.code == EXIT_UNREACHABLE
    assert "no leading coordinator reachable" in result.error_line()


@pytest.mark.parametrize(
    "command",
    [
        ("job", "nope"),
        ("checkpoints", "nope"),
        ("checkpoint", "nope"),
        ("recover", "nope"),
        ("cancel", "nope"),
    ],
    ids=lambda command: command[0],
)
async def test_unknown_job(
    coordinator: CoordinatorProcess, command: tuple[str, str]
) -> None:
    result = await run_cli(*command, "--coordinator", coordinator.address)

    assert result.code == EXIT_FAILED
    line = result.error_line()
    assert line.startswith(f"jobledger {command[0]}: job nope not found")
    assert "`jobledger jobs`" in line
    assert f"NOT_FOUND from {coordinator.address}" in line


async def test_checkpoint_of_waiting_job(coordinator: CoordinatorProcess) -> None:
    job_id = await submit_waiting_job(coordinator, Path(coordinator.log_dir))

    result = await run_cli("checkpoint", job_id, "--coordinator", coordinator.address)

    assert result.code == EXIT_FAILED
    line = result.error_line()
    assert "cannot checkpoint now" in line
    assert "FAILED_PRECONDITION" in line


async def test_invalid_graph(tmp_path: Path, coordinator: CoordinatorProcess) -> None:
    spec = keyed_sum_spec(tmp_path / "events.csv", tmp_path / "out", delay_ms=0)
    spec["vertices"][2]["type"] = "operator"
    path = write_spec(tmp_path / "job.yaml", spec)

    result = await run_cli("submit", str(path), "--coordinator", coordinator.address)

    assert result.code == EXIT_FAILED
    line = result.error_line()
    assert "the job graph has no SINK vertex" in line
    assert "INVALID_ARGUMENT" in line
    jobs = (
        await run_cli("jobs", "--coordinator", coordinator.address, "--json")
    ).json()
    assert jobs == []


async def test_bad_spec(tmp_path: Path) -> None:
    spec = keyed_sum_spec(tmp_path / "events.csv", tmp_path / "out", delay_ms=0)
    del spec["vertices"][1]["operator"]
    path = write_spec(tmp_path / "job.yaml", spec)

    # No coordinator listens there: the spec is checked before any call.
    result = await run_cli(
        "submit", str(path), "--coordinator", f"127.0.0.1:{free_port()}"
    )

    assert result.code == EXIT_USAGE
    line = result.error_line()
    assert line == (
        f"jobledger submit: {path}: vertices[1].operator: missing; "
        "this field is required"
    )


async def test_missing_spec_file(tmp_path: Path) -> None:
    result = await run_cli("submit", str(tmp_path / "absent.yaml"))

    assert result.code == EXIT_USAGE
    assert "job spec file not found; check the path" in result.error_line()


@pytest.mark.parametrize("command", ["events", "replay"])
async def test_missing_db_file(tmp_path: Path, command: str) -> None:
    path = tmp_path / "absent.db"

    result = await run_cli(command, "--db", str(path))

    assert result.code == EXIT_FAILED
    line = result.error_line()
    assert line == (
        f"jobledger {command}: log file {path} not found; give the --db path the "
        "coordinator was started with"
    )
    assert not path.exists()


async def test_db_not_a_log(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("not a database\n" * 100)

    result = await run_cli("replay", "--db", str(path))

    assert result.code == EXIT_FAILED
    assert f"{path} is not a jobledger log" in result.error_line()


async def test_bad_coordinator_address() -> None:
    result = await run_cli("jobs", "--coordinator", "localhost")

    assert result.code == EXIT_USAGE
    assert "'localhost' is not HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr


async def test_negative_recover_checkpoint() -> None:
    result = await run_cli("recover", "job-1", "--checkpoint", "-1")

    assert result.code == EXIT_USAGE
    assert "--checkpoint -1 is negative" in result.error_line()
