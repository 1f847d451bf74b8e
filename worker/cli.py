"""The ``worker`` subcommand of the ``jobledger`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

from observability import Telemetry
from observability.cli import add_metrics_arguments, instance_id, telemetry_from_args
from worker.server import Worker, WorkerConfig

T = TypeVar("T")

logger = logging.getLogger(__name__)


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _slots(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"{text} slots: give 1 to 1024")
    return value


def _host_port(address: str, lowest_port: int) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{address!r} is not HOST:PORT")
    if not lowest_port <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"port {port} of {address!r} is invalid; give {lowest_port} to 65535"
        )
    return address


def _addresses(text: str) -> list[str]:
    addresses = [part.strip() for part in text.split(",") if part.strip()]
    if not addresses:
        raise argparse.ArgumentTypeError("give at least one coordinator HOST:PORT")
    return [_host_port(address, 1) for address in addresses]


def _listen_address(text: str) -> str:
    return _host_port(text.strip(), 0)


def add_worker_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``worker`` subcommand; its handler returns the exit status."""
    parser = commands.add_parser("worker", help="run a worker (TaskManager)")
    parser.add_argument(
        "--coordinator",
        required=True,
        type=_addresses,
        help="HOST:PORT of every coordinator, separated by commas",
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:0",
        type=_listen_address,
        help="HOST:PORT to serve gRPC on; the coordinator and other workers "
        "connect to it (default %(default)s; port 0 picks one)",
    )
    parser.add_argument(
        "--slots", type=_slots, default=1, help="task slots offered (default 1)"
    )
    parser.add_argument(
        "--state-dir",
        required=True,
        help="directory of task snapshots; for recovery on another host it "
        "must be storage every worker can read",
    )
    parser.add_argument("--id", help="task manager id (default worker@HOST:PORT)")
    parser.add_argument(
        "--heartbeat-interval",
        type=_positive,
        default=10.0,
        help="seconds between heartbeats (default %(default)s)",
    )
    add_metrics_arguments(parser)
    parser.set_defaults(handler=run_worker)


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """Build the configuration from parsed ``worker`` arguments."""
    return WorkerConfig(
        coordinators=args.coordinator,
        state_dir=args.state_dir,
        listen=args.listen,
        slots=args.slots,
        task_manager_id=args.id,
        heartbeat_interval_s=args.heartbeat_interval,
    )


async def serve_until_signal(
    config: WorkerConfig, telemetry: Telemetry | None = None
) -> None:
    """Run a worker until SIGTERM or SIGINT, then stop it cleanly."""
    worker = Worker(config)
    if telemetry is not None:
        telemetry.set_epoch_source(lambda: worker.fence.highest)
        worker.register_gauges()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await worker.start()
    # A line on stdout with the port, for scripts that start a worker on port 0.
    print(f"worker {worker.task_manager_id} listening on {worker.endpoint}", flush=True)
    try:
        await stop.wait()
        logger.info("stop signal received; worker %s stops", worker.task_manager_id)
    finally:
        await worker.stop()


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new event loop, as ``asyncio.run`` does.

    The loop is uvloop's where it is installed (Linux and macOS): its
    scheduling and I/O are compiled, so every RPC, commit hand-off and task
    wake-up costs the process less than on asyncio's own loop.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def run_worker(args: argparse.Namespace) -> int:
    """Run the ``worker`` subcommand; return the exit status."""
    config = worker_config(args)
    telemetry = telemetry_from_args(
        args, "jobledger-worker", instance_id(args.id, args.listen)
    )
    try:
        run_event_loop(serve_until_signal(config, telemetry))
    finally:
        telemetry.shutdown()
    return 0
