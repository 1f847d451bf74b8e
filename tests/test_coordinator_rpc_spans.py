"""SERVER spans of a real coordinator on 127.0.0.1, for calls that fail.

The coordinator exports to an OTLP collector that this test process
serves. Each call carries a worker's traceparent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from protos import jobledger_services_pb2 as svc
from protos import jobmanager_internal_pb2 as fpb
from tests.helpers.coordinator_process import (
    CoordinatorProcess,
    leading_coordinator,
)
from tests.helpers.otlp_collector import TraceCollector

CALLER_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"
GET_JOB = "/jobledger.v1.AdminService/GetJob"
ACK_RPC = "/FlinkDotNet.Proto.TaskManagerRegistration/AcknowledgeCheckpoint"
ERROR = trace_pb2.Status.STATUS_CODE_ERROR


@pytest.fixture
async def leader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collector: TraceCollector
) -> AsyncIterator[CoordinatorProcess]:
    """A traced coordinator that leads, exporting to ``collector``."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    async with leading_coordinator(tmp_path) as coordinator:
        yield coordinator


async def wait_spans(collector: TraceCollector, name: str) -> list[trace_pb2.Span]:
    """Return the spans named ``name`` once one arrived; fail after 30 s."""
    deadline = time.monotonic() + 30
    while True:
        spans = [span for span in collector.spans() if span.name == name]
        if spans:
            return spans
        assert time.monotonic() < deadline, f"no {name} span arrived in 30 s"
        await asyncio.sleep(0.05)


def attributes(span: trace_pb2.Span) -> dict[str, object]:
    """Return the attributes of ``span`` as plain Python values."""
    values: dict[str, object] = {}
    for pair in span.attributes:
        field = pair.value.WhichOneof("value")
        values[pair.key] = getattr(pair.value, field) if field else None
    return values


@pytest.mark.parametrize(
    ("vertex", "subtask"), [("", 0), ("src", -1)], ids=["no vertex", "negative index"]
)
async def test_rejected_ack_span_names_checkpoint(
    leader: CoordinatorProcess, collector: TraceCollector, vertex: str, subtask: int
) -> None:
    # The request names its job and checkpoint, and the span is where an
    # operator looks for them, even when the task is invalid.
    request = fpb.AcknowledgeCheckpointRequest(
        job_id="job-7",
        checkpoint_id=42,
        task_manager_id="tm-a",
        job_vertex_id=vertex,
        subtask_index=subtask,
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await leader.tm.AcknowledgeCheckpoint(
            request, metadata=(("traceparent", TRACEPARENT),), timeout=5
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    (span,) = await wait_spans(collector, ACK_RPC)
    assert span.trace_id.hex() == CALLER_TRACE_ID
    assert span.parent_span_id.hex() == CALLER_SPAN_ID
    assert span.status.code == ERROR
    values = attributes(span)
    assert values.get("jobledger.checkpoint.id") == 42, values
    assert values.get("jobledger.job.id") == "job-7", values


async def test_failed_call_status_code_is_int(
    leader: CoordinatorProcess, collector: TraceCollector
) -> None:
    # The semantic conventions make rpc.grpc.status_code an int, and the
    # workers' gRPC instrumentation writes it so.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await leader.admin.GetJob(
            svc.GetJobRequest(job_id="missing"),
            metadata=(("traceparent", TRACEPARENT),),
            timeout=5,
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    (span,) = await wait_spans(collector, GET_JOB)
    assert span.parent_span_id.hex() == CALLER_SPAN_ID
    values = attributes(span)
    not_found = grpc.StatusCode.NOT_FOUND.value[0]
    assert values.get("rpc.grpc.status_code") == not_found, values


async def test_rejected_state_completion_span_names_checkpoint(
    leader: CoordinatorProcess, collector: TraceCollector
) -> None:
    request = fpb.ReportStateCompletionRequest(
        operator_instance_id="not-a-task-id", checkpoint_id=43
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await leader.jm.ReportStateCompletion(
            request, metadata=(("traceparent", TRACEPARENT),), timeout=5
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    name = "/FlinkDotNet.Proto.JobManagerInternalService/ReportStateCompletion"
    (span,) = await wait_spans(collector, name)
    assert span.parent_span_id.hex() == CALLER_SPAN_ID
    values = attributes(span)
    assert values.get("jobledger.checkpoint.id") == 43, values
    assert values.get("rpc.grpc.status_code") == 3, values
