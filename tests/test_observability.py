"""Telemetry set-up: settings from the environment, the off state, log ids,
trace carriers, and the Prometheus endpoint of a real coordinator."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.sdk.trace import SpanLimits, TracerProvider

from coordinator.entry import invalid_limit
from observability import (
    TelemetrySettings,
    TraceIdFilter,
    client_interceptors,
    server_interceptors,
    start_telemetry,
    tracing_enabled,
)
from observability.logs import LOG_FORMAT
from observability.propagation import (
    extract,
    from_barrier_options,
    has_span,
    inject,
    to_barrier_options,
)
from protos import jobmanager_internal_pb2 as fpb
from tests.helpers.coordinator_process import (
    CoordinatorProcess,
    coordinator_command,
    free_port,
)
from tests.helpers.prometheus import by_name, scrape

ENDPOINT = "http://127.0.0.1:4317"


def settings(**environ: str) -> TelemetrySettings:
    return TelemetrySettings.from_env("jobledger-test", environ)


def test_settings_default_exports_nothing() -> None:
    result = settings()
    assert result.service_name == "jobledger-test"
    assert result.traces_endpoint is None
    assert result.metrics_endpoint is None
    assert not result.tracing


def test_settings_endpoint_turns_export_on() -> None:
    result = settings(OTEL_EXPORTER_OTLP_ENDPOINT=ENDPOINT, OTEL_SERVICE_NAME="cp-1")
    assert result.service_name == "cp-1"
    assert result.traces_endpoint == ENDPOINT
    assert result.metrics_endpoint == ENDPOINT
    assert result.tracing


def test_settings_signal_endpoint_wins() -> None:
    result = settings(
        OTEL_EXPORTER_OTLP_ENDPOINT=ENDPOINT,
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://127.0.0.1:14317",
    )
    assert result.traces_endpoint == "http://127.0.0.1:14317"
    assert result.metrics_endpoint == ENDPOINT


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": "NONE"},
        {"OTEL_SDK_DISABLED": "true"},
    ],
)
def test_settings_tracing_off(environ: dict[str, str]) -> None:
    result = settings(OTEL_EXPORTER_OTLP_ENDPOINT=ENDPOINT, **environ)
    assert result.traces_endpoint is None
    assert not result.tracing


def test_settings_metrics_off_keeps_traces() -> None:
    result = settings(
        OTEL_EXPORTER_OTLP_ENDPOINT=ENDPOINT, OTEL_METRICS_EXPORTER="none"
    )
    assert result.metrics_endpoint is None
    assert result.traces_endpoint == ENDPOINT


def test_settings_excluded_services() -> None:
    result = settings(
        OTEL_PYTHON_GRPC_EXCLUDED_SERVICES=" a.B , c.D,,",
    )
    assert result.excluded_services == frozenset({"a.B", "c.D"})


def test_settings_sampler_ratio() -> None:
    result = settings(
        OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0.25"
    )
    assert result.sampler_name == "parentbased_traceidratio"
    assert result.sampler_arg == 0.25
    assert "0.25" in result.sampler().get_description()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ("OTEL_TRACES_SAMPLER_ARG", "half"),
        ("OTEL_SDK_DISABLED", "maybe"),
    ],
)
def test_settings_reject_invalid(variable: str, value: str) -> None:
    with pytest.raises(ValueError, match=variable.replace("_ARG", "")) as caught:
        settings(**{variable: value})
    assert repr(value.lower() if variable != "OTEL_TRACES_SAMPLER_ARG" else value) in (
        str(caught.value)
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_BSP_MAX_QUEUE_SIZE", "lots"),
        ("OTEL_BSP_SCHEDULE_DELAY", "0"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "-5"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "abc"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "nan"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "-1"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "inf"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "zip"),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", ""),
    ],
)
def test_settings_reject_export_variable(variable: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{variable}={value!r}"):
        settings(OTEL_EXPORTER_OTLP_ENDPOINT=ENDPOINT, **{variable: value})


def test_settings_exporter_variables_of_signal_off_ignored() -> None:
    # Metrics are off, so their exporter's variables are never read.
    result = settings(
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=ENDPOINT,
        OTEL_EXPORTER_OTLP_METRICS_TIMEOUT="abc",
        OTEL_EXPORTER_OTLP_TRACES_TIMEOUT="2.5",
        OTEL_EXPORTER_OTLP_COMPRESSION="GZIP",
    )
    assert result.traces_endpoint == ENDPOINT
    assert result.metrics_endpoint is None


def test_settings_bsp_variables_ignored_without_tracing() -> None:
    result = settings(OTEL_BSP_MAX_QUEUE_SIZE="100", OTEL_BSP_SCHEDULE_DELAY="x")
    assert result.traces_endpoint is None
    assert result.max_queue_size == 2048


def test_settings_batching_from_bsp_variables() -> None:
    result = settings(
        OTEL_EXPORTER_OTLP_ENDPOINT=ENDPOINT,
        OTEL_BSP_SCHEDULE_DELAY="250",
        OTEL_BSP_MAX_QUEUE_SIZE="100",
        OTEL_BSP_MAX_EXPORT_BATCH_SIZE="10",
    )
    assert (result.schedule_delay_ms, result.max_queue_size) == (250, 100)
    assert result.max_export_batch_size == 10


def test_settings_reject_batch_larger_than_queue() -> None:
    with pytest.raises(ValueError, match="OTEL_BSP_MAX_EXPORT_BATCH_SIZE=600 is more"):
        settings(
            OTEL_EXPORTER_OTLP_ENDPOINT=ENDPOINT,
            OTEL_BSP_MAX_QUEUE_SIZE="100",
            OTEL_BSP_MAX_EXPORT_BATCH_SIZE="600",
        )


def test_telemetry_off_installs_nothing() -> None:
    telemetry = start_telemetry("jobledger-test", "test-instance", environ={})
    try:
        assert telemetry.tracer_provider is None
        assert telemetry.meter_provider is None
        assert not tracing_enabled()
        assert server_interceptors() == []
        assert client_interceptors() is None
        assert not trace.get_current_span().get_span_context().is_valid
    finally:
        telemetry.shutdown()


def test_log_filter_adds_ids_inside_span() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TraceIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    log = logging.getLogger("tests.observability.ids")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("outside")
        tracer = TracerProvider().get_tracer("test")
        with tracer.start_as_current_span("work") as span:
            log.warning("inside job %s", "j1")
            context = span.get_span_context()
    finally:
        log.removeHandler(handler)
    outside, inside = stream.getvalue().splitlines()
    assert "trace_id" not in outside
    assert f"trace_id={context.trace_id:032x}" in inside
    assert f"span_id={context.span_id:016x}" in inside
    assert inside.endswith("inside job j1")


def test_barrier_options_round_trip() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("checkpoint") as span:
        carrier = inject()
    options = to_barrier_options(carrier)
    decoded = from_barrier_options(options)
    assert decoded == carrier
    assert has_span(decoded)
    parent = trace.get_current_span(extract(decoded)).get_span_context()
    assert parent.trace_id == span.get_span_context().trace_id
    assert parent.span_id == span.get_span_context().span_id


@pytest.mark.parametrize(
    "options",
    [
        b"",
        b"jobledger:end-of-input",
        b"jobledger:trace:{not json",
        b"jobledger:trace:[1]",
    ],
)
def test_barrier_options_of_other_kinds(options: bytes) -> None:
    assert from_barrier_options(options) == {}


def test_empty_carrier_without_span() -> None:
    assert inject() == {}
    assert to_barrier_options({}) == b""
    assert not has_span({})


async def test_coordinator_serves_prometheus_metrics(tmp_path: Path) -> None:
    metrics_port = free_port()
    coordinator = CoordinatorProcess(
        tmp_path / "log.db",
        free_port(),
        tmp_path,
        ["--metrics-port", str(metrics_port)],
    )
    try:
        await coordinator.start()
        # A registration is one durable decision: one append to the log.
        await coordinator.tm.RegisterTaskManager(
            fpb.RegisterTaskManagerRequest(
                task_manager_id="tm-x", address="127.0.0.1", port=free_port(), slots=2
            )
        )
        deadline = time.monotonic() + 30
        while True:
            text = await scrape(metrics_port)
            if 'jobledger_task_managers_registered{otel_scope_name="jobledger"' in text:
                break
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.2)
        samples = by_name(text)
        assert samples["jobledger_task_managers_registered"] == 1
        assert samples["jobledger_slots_free"] == 2
        assert samples["jobledger_log_append_duration_seconds_count"] >= 1
        assert samples["jobledger_log_append_events_count"] >= 1
        assert samples["jobledger_replay_duration_seconds_count"] == 1
        assert 'service_name="jobledger-coordinator"' in text
    finally:
        await coordinator.close()
    log = coordinator.log_tail()
    assert f"prometheus port {metrics_port}" in log


def test_metrics_port_binds_loopback_only(tmp_path: Path) -> None:
    import argparse

    from observability.cli import add_metrics_arguments

    parser = argparse.ArgumentParser()
    add_metrics_arguments(parser)
    args = parser.parse_args(["--metrics-port", "0"])
    assert args.metrics_host == "127.0.0.1"
    with pytest.raises(SystemExit):
        parser.parse_args(["--metrics-port", "70000"])


def test_metrics_port_in_use_raises(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            start_telemetry("jobledger-test", "test-instance", port, environ={})
    assert not tracing_enabled()


def test_cli_rejects_invalid_otel_variable(tmp_path: Path) -> None:
    result = subprocess.run(
        [*coordinator_command(), "coordinator", "--db", str(tmp_path / "log.db")],
        env={**os.environ, "OTEL_TRACES_EXPORTER": "zipkin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "OTEL_TRACES_EXPORTER='zipkin' is not supported" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "abc"),
        ("OTEL_SPAN_EVENT_COUNT_LIMIT", "-1"),
        ("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "unset"),
    ],
)
def test_cli_rejects_invalid_span_limit(
    variable: str, value: str, tmp_path: Path
) -> None:
    # The SDK reads OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT when it is imported.
    result = subprocess.run(
        [*coordinator_command(), "coordinator", "--db", str(tmp_path / "log.db")],
        env={**os.environ, variable: value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"jobledger: {variable}={value!r} is not a whole number" in result.stderr


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("0", True),
        ("128", True),
        (" 7 ", True),
        ("+5", True),
        ("1_000", True),
        ("", True),
        ("abc", False),
        ("-1", False),
        ("unset", False),
    ],
)
def test_span_limit_checked_as_sdk_reads_it(
    value: str, valid: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SPAN_LINK_COUNT_LIMIT", value)
    assert (invalid_limit({"OTEL_SPAN_LINK_COUNT_LIMIT": value}) is None) is valid
    if valid:
        SpanLimits()
    else:
        with pytest.raises(ValueError, match="OTEL_SPAN_LINK_COUNT_LIMIT"):
            SpanLimits()


class MetricsCollector(metrics_service_pb2_grpc.MetricsServiceServicer):
    """An OTLP metrics receiver that keeps the metric names it was sent."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.services: set[str] = set()

    async def Export(
        self,
        request: metrics_service_pb2.ExportMetricsServiceRequest,
        context: grpc.aio.ServicerContext,
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        for resource_metrics in request.resource_metrics:
            for attribute in resource_metrics.resource.attributes:
                if attribute.key == "service.name":
                    self.services.add(attribute.value.string_value)
            for scope in resource_metrics.scope_metrics:
                self.names.update(metric.name for metric in scope.metrics)
        return metrics_service_pb2.ExportMetricsServiceResponse()


async def test_coordinator_exports_metrics_over_otlp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector = MetricsCollector()
    server = grpc.aio.server()
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    coordinator = CoordinatorProcess(tmp_path / "log.db", free_port(), tmp_path)
    expected = {
        "jobledger.task_managers.registered",
        "jobledger.slots.free",
        "jobledger.log.append.duration",
        "jobledger.replay.duration",
    }
    try:
        await coordinator.start()
        await coordinator.tm.RegisterTaskManager(
            fpb.RegisterTaskManagerRequest(
                task_manager_id="tm-x", address="127.0.0.1", port=free_port(), slots=2
            )
        )
        deadline = time.monotonic() + 30
        while not expected <= collector.names:
            assert time.monotonic() < deadline, collector.names
            await asyncio.sleep(0.1)
    finally:
        await coordinator.close()
        await server.stop(None)
    assert collector.services == {"jobledger-coordinator"}
