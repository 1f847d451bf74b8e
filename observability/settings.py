"""Telemetry settings read from the standard OpenTelemetry environment variables.

Export is opt-in: traces and metrics go out over OTLP/gRPC only when an
endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or the signal's own
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``..._METRICS_ENDPOINT``). Unlike
the OpenTelemetry SDK, no endpoint is assumed when none is set, so a process
started without these variables sends nothing anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from opentelemetry.sdk.trace import sampling

OTLP = "otlp"
NONE = "none"

_SAMPLERS = {
    "always_on": lambda arg: sampling.ALWAYS_ON,
    "always_off": lambda arg: sampling.ALWAYS_OFF,
    "traceidratio": sampling.TraceIdRatioBased,
    "parentbased_always_on": lambda arg: sampling.ParentBased(sampling.ALWAYS_ON),
    "parentbased_always_off": lambda arg: sampling.ParentBased(sampling.ALWAYS_OFF),
    "parentbased_traceidratio": lambda arg: sampling.ParentBased(
        sampling.TraceIdRatioBased(arg)
    ),
}


@dataclasses.dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """The OTLP endpoints a process exports to (None: no export) and its sampler."""

    service_name: str
    traces_endpoint: str | None = None
    metrics_endpoint: str | None = None
    # Plain-text gRPC to the collector, as OTEL_EXPORTER_OTLP_INSECURE sets.
    insecure: bool = True
    sampler_name: str = "parentbased_always_on"
    sampler_arg: float = 1.0
    # Full gRPC service names left out of tracing, from the gRPC
    # instrumentation's OTEL_PYTHON_GRPC_EXCLUDED_SERVICES (comma-separated).
    excluded_services: frozenset[str] = frozenset()
    # The batching of spans, from the batch span processor's OTEL_BSP_*
    # variables, with its defaults.
    schedule_delay_ms: int = 5000
    max_queue_size: int = 2048
    max_export_batch_size: int = 512

    @property
    def tracing(self) -> bool:
        """Whether spans are recorded and exported."""
        return self.traces_endpoint is not None

    def sampler(self) -> sampling.Sampler:
        """Build the sampler that OTEL_TRACES_SAMPLER names."""
        factory = _SAMPLERS[self.sampler_name]
        return factory(self.sampler_arg)  # type: ignore[no-untyped-call]

    @classmethod
    def from_env(
        cls, default_service_name: str, environ: Mapping[str, str]
    ) -> TelemetrySettings:
        """Read the settings; raise ValueError naming an invalid variable."""
        disabled = _flag(environ, "OTEL_SDK_DISABLED", default=False)
        service_name = environ.get("OTEL_SERVICE_NAME", "").strip()
        sampler_name, sampler_arg = _sampler(environ)
        traces_endpoint = None if disabled else _endpoint(environ, "TRACES")
        metrics_endpoint = None if disabled else _endpoint(environ, "METRICS")
        # The batching is read only where spans are exported.
        batching = _batching(environ if traces_endpoint is not None else {})
        signals = [
            signal
            for signal, endpoint in (
                ("TRACES_", traces_endpoint),
                ("METRICS_", metrics_endpoint),
            )
            if endpoint is not None
        ]
        if signals:
            _check_exporter_variables(environ, ["", *signals])
        return cls(
            service_name=service_name or default_service_name,
            traces_endpoint=traces_endpoint,
            metrics_endpoint=metrics_endpoint,
            insecure=_flag(environ, "OTEL_EXPORTER_OTLP_INSECURE", default=True),
            sampler_name=sampler_name,
            sampler_arg=sampler_arg,
            excluded_services=frozenset(
                name.strip()
                for name in environ.get("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES", "").split(
                    ","
                )
                if name.strip()
            ),
            schedule_delay_ms=batching[0],
            max_queue_size=batching[1],
            max_export_batch_size=batching[2],
        )


def _batching(environ: Mapping[str, str]) -> tuple[int, int, int]:
    """Return the schedule delay in ms, the queue size and the batch size."""
    max_queue_size = _positive(environ, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
    max_export_batch_size = _positive(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
    if max_export_batch_size > max_queue_size:
        raise ValueError(
            f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE={max_export_batch_size} is more "
            f"than OTEL_BSP_MAX_QUEUE_SIZE={max_queue_size}; lower it"
        )
    delay_ms = _positive(environ, "OTEL_BSP_SCHEDULE_DELAY", 5000)
    return delay_ms, max_queue_size, max_export_batch_size


def _endpoint(environ: Mapping[str, str], signal: str) -> str | None:
    """Return the OTLP endpoint of ``signal`` (TRACES or METRICS), or None."""
    exporter_variable = f"OTEL_{signal}_EXPORTER"
    exporter = environ.get(exporter_variable, OTLP).strip().lower() or OTLP
    if exporter == NONE:
        return None
    if exporter != OTLP:
        raise ValueError(
            f"{exporter_variable}={exporter!r} is not supported; set it to "
            f"'{OTLP}' (OTLP over gRPC) or '{NONE}'"
        )
    protocol_variable = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    protocol = environ.get(
        protocol_variable, environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    ).strip()
    if protocol not in ("", "grpc"):
        raise ValueError(
            f"OTLP protocol {protocol!r} is not supported; only 'grpc' is: unset "
            f"OTEL_EXPORTER_OTLP_PROTOCOL and {protocol_variable} or set 'grpc'"
        )
    endpoint = environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "").strip()
    return endpoint or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or None


def _check_exporter_variables(environ: Mapping[str, str], signals: list[str]) -> None:
    """Raise ValueError naming an OTLP exporter variable that the exporter
    would reject or misread: a timeout, or a compression.

    ``signals`` are the infixes of the variables read: "" for the shared
    ones, "TRACES_" and "METRICS_" for a signal's own.
    """
    for signal in signals:
        name = f"OTEL_EXPORTER_OTLP_{signal}TIMEOUT"
        if name in environ:
            text = environ[name]
            try:
                seconds = float(text)
            except ValueError:
                seconds = math.nan
            if not 0 < seconds < math.inf:
                raise ValueError(
                    f"{name}={text!r} is not a positive number of seconds; "
                    "fix or unset it"
                )
        name = f"OTEL_EXPORTER_OTLP_{signal}COMPRESSION"
        if name in environ and environ[name].strip().lower() != "gzip":
            raise ValueError(
                f"{name}={environ[name]!r} is not supported; set 'gzip' or unset it"
            )


def _positive(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(
            f"{name}={text!r} is not a positive whole number; fix or unset it"
        )
    return value


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    text = environ.get(name, "").strip().lower()
    if not text:
        return default
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise ValueError(f"{name}={text!r} is not a boolean; set 'true' or 'false'")


def _sampler(environ: Mapping[str, str]) -> tuple[str, float]:
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    name = name or "parentbased_always_on"
    if name not in _SAMPLERS:
        raise ValueError(
            f"OTEL_TRACES_SAMPLER={name!r} is not supported; use one of "
            + ", ".join(sorted(_SAMPLERS))
        )
    text = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if not text:
        return name, 1.0
    try:
        ratio = float(text)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(
            f"OTEL_TRACES_SAMPLER_ARG={text!r} is not a ratio; give 0.0 to 1.0"
        )
    return name, ratio
