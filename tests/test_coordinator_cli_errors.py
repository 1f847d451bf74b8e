"""``jobledger coordinator`` refuses bad settings with one line and exits.

Each case runs the real command in a subprocess: the coordinator must print
a single error line naming the value, exit non-zero, and not linger.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Generous: the process should exit at once, but the machine may be loaded.
EXIT_DEADLINE_S = 60.0


def run_coordinator(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``jobledger coordinator ARGV``; fail the test if it does not exit."""
    command = [sys.executable, "-m", "coordinator.cli", "coordinator", *argv]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=EXIT_DEADLINE_S
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [
        line
        for line in result.stderr.splitlines()
        if line.startswith("jobledger coordinator:") or "Traceback" in line
    ]


@pytest.mark.parametrize(
    ("listen", "named"),
    [
        ("nonsense", "'nonsense'"),
        ("127.0.0.1:99999", "99999"),
        ("127.0.0.1:-1", "'127.0.0.1:-1'"),
        (":6123", "':6123'"),
    ],
)
def test_bad_listen_address_is_refused(tmp_path: Path, listen: str, named: str) -> None:
    db = tmp_path / "log.db"
    result = run_coordinator("--db", str(db), "--listen", listen)
    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr
    assert not db.exists()


def test_bad_advertise_address_is_refused(tmp_path: Path) -> None:
    result = run_coordinator(
        "--db", str(tmp_path / "log.db"), "--listen", "127.0.0.1:0",
        "--advertise", "127.0.0.1:0",
    )  # fmt: skip
    assert result.returncode == 2
    assert "'127.0.0.1:0'" in result.stderr


@pytest.mark.parametrize(
    ("delay", "named"),
    [
        ("-0.5", "-0.5"),
        ("soon", "'soon'"),
        ("nan", "nan"),
        ("inf", "inf"),
        ("1e9", "1e9"),
    ],
)
def test_bad_commit_delay_is_refused(tmp_path: Path, delay: str, named: str) -> None:
    db = tmp_path / "log.db"
    result = run_coordinator(
        "--db", str(db), "--listen", "127.0.0.1:0", "--commit-delay", delay
    )  # fmt: skip
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert "--commit-delay" in lines[0]
    assert named in lines[0]
    assert not db.exists()


def test_log_in_missing_folder_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "missing" / "log.db"
    result = run_coordinator("--db", str(db), "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert f"folder {db.parent}" in lines[0]


def test_non_log_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "notes.db"
    db.write_text("these are notes, not a jobledger log\n" * 20)
    result = run_coordinator("--db", str(db), "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert str(db) in lines[0]
    assert db.read_text().startswith("these are notes")
