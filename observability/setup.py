"""Process-wide OpenTelemetry set-up for the coordinator and the worker.

``Telemetry.start`` installs the global tracer and meter providers only for
what is configured. With no OTLP endpoint and no metrics port, it installs
nothing: the OpenTelemetry API then hands out no-op tracers and meters,
``tracing_enabled()`` is False, and no gRPC interceptor is added, so the
RPC paths run exactly as without telemetry.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

from observability.rpcspans import RpcSpanFactory
from observability.settings import TelemetrySettings

if TYPE_CHECKING:
    from observability.relay import SpanRelay

logger = logging.getLogger(__name__)

EPOCH_ATTRIBUTE = "jobledger.leader.epoch"
TRACER_NAME = "jobledger"

_active: Telemetry | None = None


def tracing_enabled() -> bool:
    """Return whether this process records spans."""
    return _active is not None and _active.settings.tracing


def rpc_spans_for(service: str) -> RpcSpanFactory | None:
    """Return the factory of RPC spans if calls of the full gRPC ``service``
    name are traced, else None."""
    active = _active
    if active is None or active.rpc_spans is None:
        return None
    if service in active.settings.excluded_services:
        return None
    return active.rpc_spans


def traces_service(service: str) -> bool:
    """Return whether RPCs of the full gRPC ``service`` name are traced."""
    return rpc_spans_for(service) is not None


def tracer() -> trace.Tracer:
    """Return the tracer of jobledger's own spans; a no-op one when tracing is off.

    The tracer comes from the installed provider itself, without the proxy
    that ``trace.get_tracer`` returns before one is installed, because spans
    on the hot RPC paths pay for every extra call.
    """
    if _active is not None and _active.tracer is not None:
        return _active.tracer
    return trace.get_tracer(TRACER_NAME)


class _EpochStamper(SpanProcessor):
    """Stamps every span with the leader epoch current when it starts.

    The epoch changes while the process runs (a standby becomes leader, a
    worker meets a new leader), and an OpenTelemetry resource is fixed when
    the provider is made, so the epoch goes on each span instead.
    """

    def __init__(self, epoch: Callable[[], int]) -> None:
        self.epoch = epoch

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        span.set_attribute(EPOCH_ATTRIBUTE, self.epoch())

    def on_end(self, span: ReadableSpan) -> None:
        pass


class Telemetry:
    """The tracer and meter providers of one process.

    ``start`` and ``shutdown`` are each safe to call twice; ``shutdown``
    flushes the spans and metrics not yet exported.
    """

    def __init__(self, settings: TelemetrySettings, instance_id: str) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.resource = Resource.create(
            {"service.name": settings.service_name, "service.instance.id": instance_id}
        )
        self.tracer_provider: TracerProvider | None = None
        self.tracer: trace.Tracer | None = None
        self.rpc_spans: RpcSpanFactory | None = None
        self.span_relay: SpanRelay | None = None
        self.meter_provider: MeterProvider | None = None
        self.metrics_port: int | None = None
        self._epoch = _EpochStamper(lambda: 0)
        self._prometheus: Any = None

    def set_epoch_source(self, epoch: Callable[[], int]) -> None:
        """Read the leader epoch of new spans from ``epoch``."""
        self._epoch.epoch = epoch
        if self.rpc_spans is not None:
            self.rpc_spans.epoch = epoch

    def start(self, metrics_port: int | None = None, metrics_host: str = "") -> None:
        """Install the providers that the settings and ``metrics_port`` call for.

        ``metrics_port`` serves Prometheus metrics on ``metrics_host``
        (127.0.0.1 by default; 0 picks a free port, see ``metrics_port``).
        Raises OSError when that port cannot be bound.
        """
        global _active
        if self.tracer_provider is not None or self.meter_provider is not None:
            return
        readers = self._metric_readers(metrics_port, metrics_host or "127.0.0.1")
        if readers:
            self.meter_provider = MeterProvider(
                resource=self.resource, metric_readers=readers
            )
            metrics.set_meter_provider(self.meter_provider)
        if self.settings.tracing:
            self.tracer_provider = self._tracer_provider()
            trace.set_tracer_provider(self.tracer_provider)
            self.tracer = self.tracer_provider.get_tracer(TRACER_NAME)
        _active = self
        logger.info(
            "telemetry of %s (%s): traces %s, metrics %s, prometheus %s",
            self.settings.service_name,
            self.instance_id,
            self.settings.traces_endpoint or "off",
            self.settings.metrics_endpoint or "off",
            f"port {self.metrics_port}" if self.metrics_port else "off",
        )

    def _tracer_provider(self) -> TracerProvider:
        # Imported here: the OTLP exporter's modules slow every start-up.
        from observability.otlp import SpanExporter
        from observability.relay import ExportSettings, SpanRelay

        settings = self.settings
        assert settings.traces_endpoint is not None
        provider = TracerProvider(resource=self.resource, sampler=settings.sampler())
        provider.add_span_processor(self._epoch)
        # The export process makes its own exporter. This one checks the
        # OTEL_EXPORTER_OTLP_* settings here, where a bad one stops the
        # start, and gives the export timeout.
        try:
            probe = SpanExporter(
                endpoint=settings.traces_endpoint, insecure=settings.insecure
            )
        except Exception as exc:
            raise ValueError(
                f"OTLP trace exporter settings are invalid: {exc}"
            ) from exc
        probe.shutdown()
        relay = SpanRelay(
            self.resource,
            TRACER_NAME,
            ExportSettings(
                endpoint=settings.traces_endpoint,
                insecure=settings.insecure,
                schedule_delay_s=settings.schedule_delay_ms / 1000,
                max_queue_size=settings.max_queue_size,
                max_export_batch_size=settings.max_export_batch_size,
                export_timeout_s=probe.timeout_s,
            ),
        )
        self.span_relay = relay
        provider.add_span_processor(relay)
        self.rpc_spans = RpcSpanFactory(
            provider.sampler,
            settings.sampler_name,
            provider.id_generator,
            relay,
            EPOCH_ATTRIBUTE,
            self._epoch.epoch,
        )
        return provider

    def _metric_readers(self, port: int | None, host: str) -> list[MetricReader]:
        readers: list[MetricReader] = []
        if self.settings.metrics_endpoint is not None:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )

            exporter = OTLPMetricExporter(
                endpoint=self.settings.metrics_endpoint,
                insecure=self.settings.insecure,
            )
            readers.append(PeriodicExportingMetricReader(exporter))
        if port is not None:
            readers.append(self._serve_prometheus(port, host))
        return readers

    def _serve_prometheus(self, port: int, host: str) -> MetricReader:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        reader = PrometheusMetricReader(registry=registry)
        server, _thread = start_http_server(port, addr=host, registry=registry)
        self._prometheus = server
        self.metrics_port = int(server.server_port)
        return reader

    def shutdown(self) -> None:
        """Flush and stop exporting; uninstall nothing. Safe to call twice.

        Blocks while the queued spans are exported, for at most one export
        timeout (OTEL_EXPORTER_OTLP_TIMEOUT, 10 s by default) and a few
        seconds for the export process to exit when the collector is
        unreachable; spans still queued then are dropped. The CLI calls
        this after the coordinator has released its lease.
        """
        global _active
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
            self.tracer_provider = None
            self.span_relay = None
            self.tracer = None
            self.rpc_spans = None
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
            self.meter_provider = None
        if self._prometheus is not None:
            self._prometheus.shutdown()
            self._prometheus.server_close()
            self._prometheus = None
        if _active is self:
            _active = None


def default_instance_id() -> str:
    """Return ``host:pid``, unique among the processes of one host."""
    return f"{socket.gethostname()}:{os.getpid()}"


def start_telemetry(
    default_service_name: str,
    instance_id: str,
    metrics_port: int | None = None,
    environ: Mapping[str, str] | None = None,
    metrics_host: str = "127.0.0.1",
) -> Telemetry:
    """Read the settings from ``environ`` (the process environment) and start.

    Raises ValueError naming an invalid variable, OSError when the metrics
    port cannot be bound.
    """
    settings = TelemetrySettings.from_env(
        default_service_name, os.environ if environ is None else environ
    )
    telemetry = Telemetry(settings, instance_id)
    telemetry.start(metrics_port, metrics_host)
    return telemetry


# Calls left out of tracing: heartbeats would add a trace per worker every
# few seconds and tell nothing about jobs or checkpoints.
UNTRACED_METHODS = ("SendHeartbeat", "Heartbeat", "Check", "Watch")


def _traced_calls() -> Any:
    from opentelemetry.instrumentation.grpc import filters

    excluded = [filters.method_name(name) for name in UNTRACED_METHODS]
    if _active is not None:
        services = sorted(_active.settings.excluded_services)
        excluded += [filters.service_name(name) for name in services]
    return filters.negate(filters.any_of(*excluded))


def server_interceptors() -> list[Any]:
    """Return the gRPC server interceptors of tracing; none when it is off."""
    if not tracing_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=_traced_calls())]  # type: ignore[no-untyped-call]


def client_interceptors() -> list[Any] | None:
    """Return the gRPC client interceptors of tracing; None when it is off."""
    if not tracing_enabled():
        return None
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    interceptors = aio_client_interceptors(filter_=_traced_calls())  # type: ignore[no-untyped-call]
    return list(interceptors)
