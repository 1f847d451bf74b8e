"""The ``jobledger`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from coordinator.client import add_client_parsers
from coordinator.config import (
    CheckpointConfig,
    CoordinatorConfig,
    ExponentialDelayRestart,
    FixedDelayRestart,
    RestartStrategy,
)
from coordinator.demo import add_demo_parser
from eventlog import DEFAULT_COMMIT_DELAY_S, EventLogError
from observability import Telemetry, configure_logging
from observability.cli import add_metrics_arguments, instance_id, telemetry_from_args
from worker.cli import add_worker_parser, run_event_loop

logger = logging.getLogger(__name__)

# The maximum commit delay the CLI accepts. A lone append, such as an idle
# coordinator's next one, waits a whole delay before the log learns that
# delaying does not pay, so an RPC reply may be delayed this long.
_MAX_COMMIT_DELAY_S = 1.0

DEFAULT_PORT = 6123


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _host_port(text: str, lowest_port: int) -> str:
    """Return ``text`` when it is HOST:PORT with a port from ``lowest_port``
    to 65535; raise ArgumentTypeError naming it otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if not lowest_port <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"port {port} of {text!r} is invalid; give {lowest_port} to 65535"
        )
    return text.strip()


def _listen_address(text: str) -> str:
    return _host_port(text, 0)


def _advertised_address(text: str) -> str:
    return _host_port(text, 1)


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _commit_delay(text: str) -> float:
    """Return ``text`` as seconds from 0 to _MAX_COMMIT_DELAY_S; raise
    ArgumentTypeError naming it otherwise (NaN and infinity included)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds"
        ) from None
    if not 0 <= value <= _MAX_COMMIT_DELAY_S:
        raise argparse.ArgumentTypeError(
            f"{text} is out of range; give 0 to {_MAX_COMMIT_DELAY_S:g} seconds"
        )
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _add_coordinator_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "coordinator", help="run a coordinator (JobManager) on a log file"
    )
    parser.add_argument(
        "--db",
        required=True,
        help="path of the SQLite event log; ':memory:' keeps it in memory, "
        "without durability (for benchmarks)",
    )
    parser.add_argument(
        "--listen",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        type=_listen_address,
        help="HOST:PORT to serve gRPC on (default %(default)s; port 0 picks one)",
    )
    parser.add_argument(
        "--advertise",
        type=_advertised_address,
        help="HOST:PORT others reach this one at",
    )
    parser.add_argument("--coordinator-id", help="identity in the lease and logs")
    group = parser.add_argument_group("checkpoints")
    group.add_argument(
        "--checkpoint-interval",
        type=_positive,
        help="seconds between periodic checkpoints (default: off)",
    )
    group.add_argument(
        "--checkpoint-timeout",
        type=_positive,
        default=600.0,
        help="seconds after which a pending checkpoint expires (default %(default)s)",
    )
    group.add_argument(
        "--min-pause",
        type=_non_negative,
        default=0.0,
        help="seconds from the end of one checkpoint to the next trigger "
        "(default %(default)s)",
    )
    group.add_argument(
        "--max-concurrent-checkpoints",
        type=int,
        default=1,
        help="checkpoints of one job pending at once (default %(default)s)",
    )
    group.add_argument(
        "--tolerable-failed-checkpoints",
        type=_count,
        default=0,
        help="failed checkpoints in a row that do not fail the job over "
        "(default %(default)s)",
    )
    group.add_argument(
        "--retained-checkpoints",
        type=int,
        default=1,
        help="completed checkpoints kept per job (default %(default)s)",
    )
    group = parser.add_argument_group("task managers")
    group.add_argument(
        "--heartbeat-interval",
        type=_positive,
        default=10.0,
        help="seconds the workers are expected to heartbeat at; silent workers are "
        "checked at this interval, at least once a second (default %(default)s)",
    )
    group.add_argument(
        "--heartbeat-timeout",
        type=_positive,
        default=50.0,
        help="seconds of silence after which a worker is lost (default %(default)s)",
    )
    group.add_argument(
        "--default-slots",
        type=int,
        default=1,
        help="slots of a worker that registers without a slot count "
        "(default %(default)s)",
    )
    group.add_argument(
        "--max-parallelism",
        type=int,
        default=128,
        help="highest parallelism a vertex may have (default %(default)s)",
    )
    group = parser.add_argument_group("restart strategy")
    group.add_argument(
        "--restart-strategy",
        choices=("exponential-delay", "fixed-delay"),
        default="exponential-delay",
        help="how a failed job is restarted (default %(default)s)",
    )
    group.add_argument(
        "--restart-initial-delay",
        type=_non_negative,
        default=1.0,
        help="exponential-delay: seconds before the first restart "
        "(default %(default)s)",
    )
    group.add_argument(
        "--restart-max-delay",
        type=_non_negative,
        default=300.0,
        help="exponential-delay: maximum seconds between restarts "
        "(default %(default)s)",
    )
    group.add_argument(
        "--restart-multiplier",
        type=_positive,
        default=2.0,
        help="exponential-delay: factor of the delay per restart (default %(default)s)",
    )
    group.add_argument(
        "--restart-jitter",
        type=_non_negative,
        default=0.1,
        help="exponential-delay: random share added to or taken from a delay "
        "(default %(default)s)",
    )
    group.add_argument(
        "--restart-reset-after",
        type=_positive,
        default=3600.0,
        help="exponential-delay: seconds of running after which the delay starts over "
        "(default %(default)s)",
    )
    group.add_argument(
        "--restart-attempts",
        type=_count,
        default=3,
        help="fixed-delay: restarts before the job fails (default %(default)s)",
    )
    group.add_argument(
        "--restart-delay",
        type=_non_negative,
        default=1.0,
        help="fixed-delay: seconds before each restart (default %(default)s)",
    )
    group = parser.add_argument_group("log and leadership")
    group.add_argument(
        "--lease",
        type=_positive,
        default=2.0,
        help="seconds the leader's lease lasts without renewal; the leader renews "
        "it every third of that, and a standby takes over once it expires "
        "(default %(default)s)",
    )
    group.add_argument(
        "--commit-delay",
        type=_commit_delay,
        default=DEFAULT_COMMIT_DELAY_S,
        help="maximum seconds the log delays a small commit while appends keep "
        "arriving, so that one fsync covers more of them; 0 commits at once, "
        f"{_MAX_COMMIT_DELAY_S:g} at most (default %(default)s)",
    )
    group.add_argument(
        "--snapshot-every",
        type=_count,
        default=10_000,
        help="events between two snapshots of the state; 0 turns them off "
        "(default %(default)s)",
    )
    group.add_argument(
        "--retain-events",
        type=_count,
        default=10_000,
        help="events kept behind the newest snapshot when compacting "
        "(default %(default)s)",
    )
    add_metrics_arguments(parser)
    parser.set_defaults(handler=_run_coordinator)


def _restart_strategy(args: argparse.Namespace) -> RestartStrategy:
    if args.restart_strategy == "fixed-delay":
        return FixedDelayRestart(
            attempts=args.restart_attempts, delay_s=args.restart_delay
        )
    return ExponentialDelayRestart(
        initial_s=args.restart_initial_delay,
        max_s=args.restart_max_delay,
        multiplier=args.restart_multiplier,
        jitter=args.restart_jitter,
        reset_after_s=args.restart_reset_after,
    )


def coordinator_config(args: argparse.Namespace) -> CoordinatorConfig:
    """Build the configuration from parsed ``coordinator`` arguments.

    Raises ValueError naming the first invalid combination.
    """
    if args.max_concurrent_checkpoints < 1:
        raise ValueError("--max-concurrent-checkpoints must be 1 or more")
    if args.retained_checkpoints < 1:
        raise ValueError("--retained-checkpoints must be 1 or more")
    if args.default_slots < 1:
        raise ValueError("--default-slots must be 1 or more")
    if args.heartbeat_timeout <= args.heartbeat_interval:
        raise ValueError("--heartbeat-timeout must be longer than --heartbeat-interval")
    return CoordinatorConfig(
        db_path=args.db,
        listen=args.listen,
        advertise=args.advertise,
        coordinator_id=args.coordinator_id,
        checkpoints=CheckpointConfig(
            interval_s=args.checkpoint_interval,
            timeout_s=args.checkpoint_timeout,
            min_pause_s=args.min_pause,
            max_concurrent=args.max_concurrent_checkpoints,
            tolerable_failed=args.tolerable_failed_checkpoints,
            retained=args.retained_checkpoints,
        ),
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_timeout_s=args.heartbeat_timeout,
        default_slots=args.default_slots,
        max_parallelism=args.max_parallelism,
        restart=_restart_strategy(args),
        lease_s=args.lease,
        commit_delay_s=args.commit_delay,
        snapshot_every=args.snapshot_every,
        retain_events=args.retain_events,
    )


async def _serve_until_signal(
    config: CoordinatorConfig, telemetry: Telemetry | None = None
) -> None:
    from coordinator.server import Coordinator

    coordinator = Coordinator(config)
    if telemetry is not None:
        telemetry.set_epoch_source(
            lambda: coordinator.engine.epoch if coordinator.engine else 0
        )
        coordinator.register_gauges()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        # A failed start still closes the log: its thread would keep the
        # process alive after the error.
        await coordinator.start()
        await stop.wait()
        logger.info("stop signal received")
    finally:
        await coordinator.stop()


def _run_coordinator(args: argparse.Namespace) -> int:
    config = coordinator_config(args)
    telemetry = telemetry_from_args(
        args, "jobledger-coordinator", instance_id(args.coordinator_id, args.listen)
    )
    try:
        run_event_loop(_serve_until_signal(config, telemetry))
    finally:
        telemetry.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of every ``jobledger`` subcommand."""
    parser = argparse.ArgumentParser(
        prog="jobledger",
        description="A fault-tolerant, event-sourced JobManager for stream jobs.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (default %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_coordinator_parser(commands)
    add_worker_parser(commands)
    add_client_parsers(commands)
    add_demo_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.handler(args))
    except ValueError as exc:
        print(f"jobledger {args.command}: {exc}", file=sys.stderr)
        return 2
    except (OSError, EventLogError) as exc:
        print(f"jobledger {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
