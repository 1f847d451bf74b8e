"""The ``worker`` subcommand of the ``jobledger`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from worker.server import Worker, WorkerConfig

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


def _addresses(text: str) -> list[str]:
    addresses = [part.strip() for part in text.split(",") if part.strip()]
    if not addresses:
        raise argparse.ArgumentTypeError("give at least one coordinator HOST:PORT")
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"{address!r} is not HOST:PORT")
    return addresses


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


async def serve_until_signal(config: WorkerConfig) -> None:
    """Run a worker until SIGTERM or SIGINT, then stop it cleanly."""
    worker = Worker(config)
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


def run_worker(args: argparse.Namespace) -> int:
    """Run the ``worker`` subcommand; return the exit status."""
    asyncio.run(serve_until_signal(worker_config(args)))
    return 0
