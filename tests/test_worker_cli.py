"""The ``worker`` subcommand's arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from worker.cli import add_worker_parser, run_worker, worker_config
from worker.server import Worker, WorkerConfig


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jobledger")
    add_worker_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["worker", *argv])


def test_worker_arguments_build_config() -> None:
    args = parse(
        "--coordinator",
        "127.0.0.1:6123, 127.0.0.1:6124",
        "--listen",
        "127.0.0.1:7000",
        "--slots",
        "3",
        "--state-dir",
        "/tmp/state",
        "--id",
        "tm-7",
        "--heartbeat-interval",
        "0.5",
    )
    assert args.handler is run_worker
    config = worker_config(args)
    assert config.coordinators == ["127.0.0.1:6123", "127.0.0.1:6124"]
    assert config.listen == "127.0.0.1:7000"
    assert config.slots == 3
    assert config.state_dir == "/tmp/state"
    assert config.task_manager_id == "tm-7"
    assert config.heartbeat_interval_s == 0.5
    assert config.incarnation > 0


def test_worker_defaults() -> None:
    config = worker_config(parse("--coordinator", "127.0.0.1:1", "--state-dir", "s"))
    assert config.slots == 1
    assert config.listen == "127.0.0.1:0"
    assert config.task_manager_id is None
    assert config.heartbeat_interval_s == 10.0


@pytest.mark.parametrize(
    "argv",
    [
        ("--coordinator", "no-port", "--state-dir", "s"),
        ("--coordinator", "127.0.0.1:1", "--state-dir", "s", "--slots", "0"),
        (
            "--coordinator",
            "127.0.0.1:1",
            "--state-dir",
            "s",
            "--heartbeat-interval",
            "0",
        ),
        ("--coordinator", "127.0.0.1:1"),
        ("--coordinator", "127.0.0.1:70000", "--state-dir", "s"),
        ("--coordinator", "127.0.0.1:0", "--state-dir", "s"),
        ("--coordinator", "127.0.0.1:1", "--state-dir", "s", "--listen", "h:99999"),
        ("--coordinator", "127.0.0.1:1", "--state-dir", "s", "--listen", "7000"),
    ],
)
def test_worker_invalid_arguments(
    argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        parse(*argv)
    assert raised.value.code == 2
    assert "error" in capsys.readouterr().err


async def test_unwritable_state_dir_named(tmp_path: Path) -> None:
    plain_file = tmp_path / "a-file"
    plain_file.write_text("")
    worker = Worker(
        WorkerConfig(coordinators=["127.0.0.1:1"], state_dir=str(plain_file / "state"))
    )
    with pytest.raises(OSError, match=f"state directory {plain_file / 'state'} cannot"):
        await worker.start()
    await worker.stop()
