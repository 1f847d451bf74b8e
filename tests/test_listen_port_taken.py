"""A coordinator or worker refuses a port another process already serves on.

Each case runs the real command: the second process must print one error
line naming the address, exit with 1, and leave the first one serving.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.coordinator_process import free_port

# Generous: the second process should exit at once, but the machine may be loaded.
EXIT_DEADLINE_S = 60.0


def command(kind: str, port: int, folder: Path) -> list[str]:
    """Return the command line of a ``kind`` process on ``port``."""
    listen = f"127.0.0.1:{port}"
    if kind == "coordinator":
        return [sys.executable, "-m", "coordinator.cli", "coordinator",
                "--db", str(folder / "log.db"), "--listen", listen]  # fmt: skip
    # The coordinator address is never dialled before the bind fails or,
    # for the first worker, before the test ends.
    return [sys.executable, "-m", "coordinator.cli", "worker",
            "--coordinator", f"127.0.0.1:{free_port()}", "--listen", listen,
            "--state-dir", str(folder / "state")]  # fmt: skip


def wait_serving(process: subprocess.Popen[str]) -> None:
    """Read the first process's log until it serves; fail if it exits."""
    assert process.stderr is not None
    for line in process.stderr:
        if "serving on" in line:
            return
    pytest.fail(f"the first process exited with {process.wait()}")


@pytest.mark.parametrize("kind", ["coordinator", "worker"])
def test_second_process_on_a_taken_port_is_refused(kind: str, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = subprocess.Popen(
        command(kind, port, tmp_path / "first"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_serving(first)
        second = subprocess.run(
            command(kind, port, tmp_path / "second"),
            capture_output=True, text=True, timeout=EXIT_DEADLINE_S,
        )  # fmt: skip
        assert second.returncode == 1, second.stderr
        errors = [
            line
            for line in second.stderr.splitlines()
            if line.startswith(f"jobledger {kind}:") or "Traceback" in line
        ]
        assert len(errors) == 1, second.stderr
        assert f"127.0.0.1:{port}" in errors[0]
        assert first.poll() is None
    finally:
        first.kill()
        first.wait(EXIT_DEADLINE_S)
