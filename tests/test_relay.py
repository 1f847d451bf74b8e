"""The span relay: spans handed to a real export process, sent to a real
OTLP collector on 127.0.0.1, with the export process and its parent killed."""

from __future__ import annotations

import enum
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import SpanKind

from observability import relay
from observability.relay import ExportSettings, SpanRelay
from observability.rpcspans import RpcSpan, RpcSpanFactory
from observability.settings import TelemetrySettings
from tests.helpers.coordinator_process import free_port
from tests.helpers.otlp_collector import TraceCollector

SCOPE = "jobledger"
RESOURCE = Resource.create(
    {"service.name": "jobledger-relay-test", "service.instance.id": "test:1"}
)
ROOT = Path(__file__).resolve().parent.parent


class Tracing:
    """A relay with a tracer provider and an RpcSpan factory feeding it."""

    def __init__(self, settings: ExportSettings, command: list[str] | None = None):
        self.relay = SpanRelay(RESOURCE, SCOPE, settings, command)
        self.provider = TracerProvider(resource=RESOURCE)
        self.provider.add_span_processor(self.relay)
        self.factory = RpcSpanFactory(
            self.provider.sampler,
            TelemetrySettings("jobledger-relay-test").sampler_name,
            RandomIdGenerator(),
            self.relay,
            "jobledger.leader.epoch",
            lambda: 3,
        )

    def rpc_spans(self, count: int, first: int = 0) -> None:
        for index in range(first, first + count):
            span = self.factory.start(
                "/jobledger.Test/Call", SpanKind.SERVER, None, {"index": index}
            )
            span.end()

    def sdk_spans(self, count: int) -> None:
        tracer = self.provider.get_tracer("jobledger.relay.test")
        for index in range(count):
            with tracer.start_as_current_span(f"sdk-{index}"):
                pass

    def shutdown(self) -> None:
        self.provider.shutdown()


@pytest.fixture
def tracing(collector: TraceCollector) -> Iterator[Tracing]:
    tracing = Tracing(ExportSettings(endpoint=collector.endpoint))
    yield tracing
    tracing.shutdown()


def indexes(collector: TraceCollector) -> list[int]:
    return sorted(
        kv.value.int_value
        for span in collector.spans()
        for kv in span.attributes
        if kv.key == "index"
    )


def test_relay_flush_exports_rpc_and_sdk_spans(
    tracing: Tracing, collector: TraceCollector
) -> None:
    tracing.rpc_spans(10)
    tracing.sdk_spans(2)
    assert tracing.relay.force_flush(30_000)
    scopes = {
        (
            dict((kv.key, kv.value.string_value) for kv in rs.resource.attributes)[
                "service.name"
            ],
            ss.scope.name,
        ): len(ss.spans)
        for request in collector.requests
        for rs in request.resource_spans
        for ss in rs.scope_spans
    }
    assert scopes == {
        ("jobledger-relay-test", SCOPE): 10,
        ("jobledger-relay-test", "jobledger.relay.test"): 2,
    }
    assert indexes(collector) == list(range(10))


def test_relay_batches_by_max_export_batch_size(collector: TraceCollector) -> None:
    tracing = Tracing(
        ExportSettings(
            endpoint=collector.endpoint, max_queue_size=64, max_export_batch_size=4
        )
    )
    try:
        tracing.rpc_spans(10)
        assert tracing.relay.force_flush(30_000)
    finally:
        tracing.shutdown()
    sizes = [
        sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        for request in collector.requests
    ]
    assert sum(sizes) == 10
    assert max(sizes) <= 4, sizes


def test_relay_exports_after_schedule_delay(collector: TraceCollector) -> None:
    tracing = Tracing(ExportSettings(endpoint=collector.endpoint, schedule_delay_s=0.2))
    try:
        tracing.rpc_spans(3)
        # No flush: the spans go out once the schedule delay has passed.
        assert len(collector.wait_spans(3, timeout_s=30)) == 3
    finally:
        tracing.shutdown()


def test_relay_shutdown_exports_the_rest(
    tracing: Tracing, collector: TraceCollector
) -> None:
    tracing.rpc_spans(25)
    tracing.shutdown()
    assert indexes(collector) == list(range(25))
    child = tracing.relay.child_pid
    assert child is None


def test_relay_replaces_killed_export_process(
    collector: TraceCollector,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(relay, "RESPAWN_S", 0.2)
    tracing = Tracing(ExportSettings(endpoint=collector.endpoint))
    try:
        replace_killed_export_process(tracing, collector, caplog)
    finally:
        tracing.shutdown()


def replace_killed_export_process(
    tracing: Tracing, collector: TraceCollector, caplog: pytest.LogCaptureFixture
) -> None:
    tracing.rpc_spans(5)
    assert tracing.relay.force_flush(30_000)
    first = tracing.relay.child_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_gone(first)

    # The next hand-over finds the process gone; one after RESPAWN_S
    # starts another, which takes the spans from then on.
    deadline = time.monotonic() + 30
    flushed = False
    while not flushed:
        assert time.monotonic() < deadline, "no export process took spans again"
        time.sleep(0.3)
        flushed = tracing.relay.force_flush(30_000)
    tracing.rpc_spans(5, first=100)
    assert tracing.relay.force_flush(30_000)

    assert tracing.relay.child_pid not in (None, first)
    assert indexes(collector) == [*range(5), *range(100, 105)]
    assert f"span export process {first} exited with status -9" in caplog.text


def test_relay_parent_sigkill_keeps_handed_over_spans(
    collector: TraceCollector, tmp_path: Path
) -> None:
    # A parent that ends its spans, waits past one hand-over and kills
    # itself: its export process still sends the spans, then exits.
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal, sys, time
            sys.path.insert(0, {str(ROOT)!r})
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import sampling
            from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
            from opentelemetry.trace import SpanKind
            from observability.relay import HAND_OVER_S, ExportSettings, SpanRelay
            from observability.rpcspans import RpcSpan, RpcSpanFactory

            settings = ExportSettings(endpoint={collector.endpoint!r})
            relay = SpanRelay(Resource.create(), "jobledger", settings)
            factory = RpcSpanFactory(
                sampling.ALWAYS_ON, "always_on", RandomIdGenerator(), relay,
                "jobledger.leader.epoch", lambda: 1,
            )
            for index in range(40):
                attributes = {{"index": index}}
                factory.start("/t/Call", SpanKind.SERVER, None, attributes).end()
            time.sleep(5 * HAND_OVER_S)
            print(relay.child_pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    parent = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    child = int(parent.stdout.strip())
    collector.wait_spans(40, timeout_s=30)
    assert indexes(collector) == list(range(40))
    wait_gone(child)


def test_relay_shutdown_bounded_when_collector_unreachable() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    tracing = Tracing(ExportSettings(endpoint=closed, export_timeout_s=1.0))
    tracing.rpc_spans(50)
    started = time.monotonic()
    tracing.shutdown()
    elapsed = time.monotonic() - started
    # One export timeout, and the grace for the process to exit after it.
    assert elapsed < 1.0 + relay.EXIT_GRACE_S, elapsed


def test_relay_drops_spans_beyond_the_queue(
    collector: TraceCollector, caplog: pytest.LogCaptureFixture
) -> None:
    tracing = Tracing(
        ExportSettings(
            endpoint=collector.endpoint, max_queue_size=8, max_export_batch_size=8
        )
    )
    try:
        # Holding the relay's lock keeps the hand-over from emptying the
        # queue while the spans end.
        with tracing.relay._lock:
            tracing.rpc_spans(20)
        assert tracing.relay.force_flush(30_000)
    finally:
        tracing.shutdown()
    assert indexes(collector) == list(range(8))
    assert "12 spans dropped: more than OTEL_BSP_MAX_QUEUE_SIZE=8" in caplog.text


def test_relay_without_child_loses_spans(
    collector: TraceCollector, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    missing = str(tmp_path / "no-such-python")
    tracing = Tracing(ExportSettings(endpoint=collector.endpoint), command=[missing])
    try:
        tracing.rpc_spans(3)
        assert not tracing.relay.force_flush(1_000)
    finally:
        tracing.shutdown()
    assert "span export process not started" in caplog.text
    assert "3 spans lost: no export process took them" in caplog.text
    assert collector.spans() == []


def wait_gone(pid: int, timeout_s: float = 30.0) -> None:
    """Wait until process ``pid`` has exited and been reaped."""
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists():
        status = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        if status and status[0] == "Z":
            return
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


class Outcome(enum.IntEnum):
    ACCEPTED = 1


class Phase(enum.StrEnum):
    SNAPSHOT = "snapshot"


def test_relay_enum_attributes_exported_as_values(
    tracing: Tracing, collector: TraceCollector
) -> None:
    span = tracing.factory.start("/jobledger.Test/Call", SpanKind.SERVER, None, {})
    span.set_attribute("outcome", Outcome.ACCEPTED)
    span.set_attribute("phase", Phase.SNAPSHOT)
    span.end()
    tracing.rpc_spans(3)
    assert tracing.relay.force_flush(30_000)
    (exported,) = [s for s in collector.spans() if len(s.attributes) > 2]
    values = {kv.key: kv.value for kv in exported.attributes}
    assert values["outcome"].int_value == 1
    assert values["phase"].string_value == "snapshot"
    assert indexes(collector) == [0, 1, 2]


def test_relay_unencodable_span_dropped_alone(
    tracing: Tracing, collector: TraceCollector, caplog: pytest.LogCaptureFixture
) -> None:
    # A value stored without the checks of set_attribute, as the inline
    # path of annotate_rpc stores them.
    span = tracing.factory.start("/jobledger.Test/Call", SpanKind.SERVER, None, {})
    assert isinstance(span, RpcSpan)
    span.attributes["outcome"] = Outcome.ACCEPTED
    span.end()
    tracing.rpc_spans(3)
    assert tracing.relay.force_flush(30_000)
    assert indexes(collector) == [0, 1, 2]
    assert "1 spans dropped: an attribute value is not a plain" in caplog.text


def test_relay_flush_false_when_export_fails() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    tracing = Tracing(ExportSettings(endpoint=closed, export_timeout_s=1.0))
    try:
        tracing.rpc_spans(5)
        assert not tracing.relay.force_flush(30_000)
    finally:
        tracing.shutdown()


def test_relay_flush_keeps_its_timeout_with_stopped_child(
    tracing: Tracing,
) -> None:
    child = tracing.relay.child_pid
    assert child is not None
    os.kill(child, signal.SIGSTOP)
    try:
        # More than the pipe holds, so that the hand-over blocks on it.
        for _ in range(20):
            tracing.rpc_spans(1000)
            time.sleep(relay.HAND_OVER_S)
        started = time.monotonic()
        flushed = tracing.relay.force_flush(500)
        elapsed = time.monotonic() - started
    finally:
        os.kill(child, signal.SIGCONT)
    assert not flushed
    # Well under the write timeout, which a flush used to wait out.
    assert elapsed < relay.WRITE_TIMEOUT_S - 1, elapsed
