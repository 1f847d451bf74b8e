"""Command-line options of telemetry, shared by the coordinator and the worker."""

from __future__ import annotations

import argparse

from observability.setup import Telemetry, default_instance_id, start_telemetry


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port; give 0 to 65535")
    return value


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--metrics-port`` and ``--metrics-host``."""
    group = parser.add_argument_group(
        "telemetry",
        "traces and metrics are exported over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT "
        "is set (see the OpenTelemetry environment variables)",
    )
    group.add_argument(
        "--metrics-port",
        type=_port,
        help="serve Prometheus metrics on this port at /metrics (default: off; "
        "0 picks a free port)",
    )
    group.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address the Prometheus endpoint binds (default %(default)s)",
    )


def instance_id(explicit: str | None, listen: str) -> str:
    """Return the ``service.instance.id``: the given id, the listen address
    when its port is fixed, or host:pid."""
    if explicit:
        return explicit
    if not listen.endswith(":0"):
        return listen
    return default_instance_id()


def telemetry_from_args(
    args: argparse.Namespace, service_name: str, instance: str
) -> Telemetry:
    """Start telemetry from the environment and the metrics options.

    Raises ValueError naming an invalid OTEL_* variable, OSError when the
    metrics port cannot be bound.
    """
    try:
        return start_telemetry(
            service_name, instance, args.metrics_port, metrics_host=args.metrics_host
        )
    except OSError as exc:
        raise OSError(
            f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {exc}"
        ) from exc
