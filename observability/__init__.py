"""Tracing, metrics and logging set-up shared by the coordinator and the worker."""

from observability.logs import TraceIdFilter, configure_logging
from observability.settings import TelemetrySettings
from observability.setup import (
    Telemetry,
    client_interceptors,
    default_instance_id,
    server_interceptors,
    start_telemetry,
    tracer,
    traces_service,
    tracing_enabled,
)

__all__ = [
    "Telemetry",
    "TelemetrySettings",
    "TraceIdFilter",
    "client_interceptors",
    "configure_logging",
    "default_instance_id",
    "server_interceptors",
    "start_telemetry",
    "tracer",
    "traces_service",
    "tracing_enabled",
]
