"""Faults around the coordinator's RPC spans, with real coordinator processes.

The collector is either a closed port on 127.0.0.1, so that every export
fails with UNAVAILABLE, or a real Jaeger that the spans are read back from.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos import jobledger_services_pb2 as svc
from protos import jobmanager_internal_pb2 as fpb
from tests.helpers.coordinator_process import (
    CoordinatorProcess,
    free_port,
    leading_coordinator,
)
from tests.helpers.jaeger import Jaeger, jaeger_binary, tags

# More RPCs than the span queue can contain (OTEL_BSP_MAX_QUEUE_SIZE, 2048
# by default), sent in rounds of ROUND concurrent calls.
RPCS = 4000
ROUND = 200
# The exporter gives up on one batch after OTEL_EXPORTER_OTLP_TIMEOUT
# (10 s by default). A stop may wait for that once, and gets as much again
# as slack for a loaded machine.
EXPORT_TIMEOUT_S = 10.0
STOP_LIMIT_S = 2 * EXPORT_TIMEOUT_S


@pytest.fixture
async def unreachable_collector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[CoordinatorProcess]:
    """Start a coordinator that exports its spans to a closed port."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", str(int(EXPORT_TIMEOUT_S)))
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    async with leading_coordinator(tmp_path) as coordinator:
        yield coordinator


async def test_sigterm_unreachable_collector_backlog(
    unreachable_collector: CoordinatorProcess,
) -> None:
    coordinator = unreachable_collector
    for _ in range(RPCS // ROUND):
        replies = await asyncio.gather(
            *(
                coordinator.admin.GetOverview(svc.GetOverviewRequest(), timeout=30)
                for _ in range(ROUND)
            )
        )
        assert all(reply.epoch == 1 for reply in replies)

    started = time.monotonic()
    try:
        status = await coordinator.terminate(timeout_s=3 * STOP_LIMIT_S)
    except TimeoutError:
        pytest.fail(f"SIGTERM did not stop the coordinator in {3 * STOP_LIMIT_S} s")
    stopped_s = time.monotonic() - started

    assert status == 0, coordinator.log_tail()
    log = coordinator.log_tail(lines=10_000)
    assert "Traceback" not in log
    # Every queued batch retries for up to the export timeout in turn, so
    # without a bound on the flush a stop waits for the processor's own
    # 30 s shutdown limit.
    assert stopped_s < STOP_LIMIT_S, (
        f"SIGTERM took {stopped_s:.1f} s with OTEL_EXPORTER_OTLP_TIMEOUT="
        f"{EXPORT_TIMEOUT_S:.0f}; the log ends with:\n{coordinator.log_tail()}"
    )


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
ACK_RPC = "/FlinkDotNet.Proto.TaskManagerRegistration/AcknowledgeCheckpoint"
# Trace headers that name no valid parent, by the W3C Trace Context rules
# that the OpenTelemetry propagator applies.
MALFORMED_TRACE_HEADERS: dict[str, tuple[tuple[str, str], ...]] = {
    "junk": (("traceparent", "00-zz-.."),),
    "empty": (("traceparent", ""),),
    "zero-trace-id": (("traceparent", f"00-{'0' * 32}-{PARENT_ID}-01"),),
    "zero-span-id": (("traceparent", f"00-{TRACE_ID}-{'0' * 16}-01"),),
    "version-ff": (("traceparent", f"ff-{TRACE_ID}-{PARENT_ID}-01"),),
    "version-00-extra": (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01-x"),),
    "uppercase": (("traceparent", f"00-{TRACE_ID.upper()}-{PARENT_ID}-01"),),
    "too-long": (("traceparent", "00-" + "a" * 6000),),
    "tracestate-only": (("tracestate", "vendor=abc"),),
}


@pytest.fixture
async def traced_coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[CoordinatorProcess, Jaeger]]:
    """Start a Jaeger and a coordinator that exports its spans there."""
    jaeger_binary()
    jaeger = Jaeger(tmp_path)
    coordinator = CoordinatorProcess(tmp_path / "log.db", free_port(), tmp_path)
    try:
        await jaeger.start()
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", jaeger.otlp_endpoint)
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        await coordinator.start()
        yield coordinator, jaeger
    finally:
        await coordinator.close()
        await jaeger.stop()


async def acknowledge(
    coordinator: CoordinatorProcess, job_id: str, metadata: tuple[tuple[str, str], ...]
) -> grpc.StatusCode:
    """Acknowledge a checkpoint of an unknown job and return the call's status."""
    request = fpb.AcknowledgeCheckpointRequest(
        job_id=job_id, checkpoint_id=7, job_vertex_id="src", subtask_index=0
    )
    try:
        await coordinator.tm.AcknowledgeCheckpoint(
            request, metadata=metadata, timeout=30
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def ack_spans_by_job(jaeger: Jaeger, count: int) -> dict[str, dict[str, Any]]:
    """Return the coordinator's AcknowledgeCheckpoint spans by job id, once
    ``count`` of them are stored. Fail after 60 s."""
    deadline = time.monotonic() + 60
    while True:
        found = {
            str(tags(span).get("jobledger.job.id")): span
            for trace in await jaeger.traces("jobledger-coordinator")
            for span in trace["spans"]
            if span["operationName"] == ACK_RPC
        }
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {count} spans after 60 s: {found}")
        await asyncio.sleep(0.2)


async def test_malformed_traceparent_gives_root_span(
    traced_coordinator: tuple[CoordinatorProcess, Jaeger],
) -> None:
    coordinator, jaeger = traced_coordinator
    expected = await acknowledge(coordinator, "no-headers", ())
    for name, metadata in MALFORMED_TRACE_HEADERS.items():
        assert await acknowledge(coordinator, name, metadata) == expected, name
    valid = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
    assert await acknowledge(coordinator, "valid", valid) == expected

    found = await ack_spans_by_job(jaeger, len(MALFORMED_TRACE_HEADERS) + 2)
    for name in MALFORMED_TRACE_HEADERS:
        assert found[name]["references"] == [], name
    (reference,) = found["valid"]["references"]
    assert reference["spanID"] == PARENT_ID
    assert reference["traceID"] == TRACE_ID
    assert "Traceback" not in coordinator.log_tail(lines=10_000)
