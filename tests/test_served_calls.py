"""SERVER spans of calls served by the coordinator's ``rpc`` handlers: the
annotations and log lines of a call whose span reads the caller's headers
only when asked."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from coordinator.servicers import rpc
from observability import setup
from observability.logs import TraceIdFilter
from observability.spans import JOB, annotate_rpc
from tests.helpers.otlp_collector import TraceCollector

METHOD = "Call"
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CALLER_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN_ID = "b7ad6b7169203331"
# A worker's traceparent: version 00, sampled, 55 characters long.
TRACEPARENT = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"


@pytest.fixture
def trace_log() -> Iterator[io.StringIO]:
    """Log output filtered by TraceIdFilter, as configure_logging sets it up."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TraceIdFilter())
    handler.setFormatter(logging.Formatter("%(name)s%(trace_ids)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


class StepEcho:
    """A traced method that annotates its RPC span from inside a step span."""

    @rpc
    async def Call(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        with setup.tracer().start_as_current_span("review.step"):
            annotate_rpc({JOB: "job-7"})
        return request


class LoggingEcho:
    """A traced method that writes one log line, as SubmitJob does."""

    @rpc
    async def Call(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        logging.getLogger("coordinator.review").info("request served")
        return request


async def serve_one_call(
    servicer: StepEcho | LoggingEcho, metadata: tuple[tuple[str, str], ...] = ()
) -> None:
    """Serve one call of ``servicer`` on 127.0.0.1 and check its reply.

    The ``rpc`` wrapper names the service after the servicer class. The
    span ends before the reply is sent.
    """
    service = type(servicer).__name__
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(servicer.Call)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {METHOD: handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        call = channel.unary_unary(f"/{service}/{METHOD}")
        try:
            reply = await call(b"hello", metadata=metadata, timeout=5)
        except grpc.aio.AioRpcError as exc:
            pytest.fail(f"the call failed: {exc.code().name} {exc.details()}")
        assert reply == b"hello"
    finally:
        await channel.close()
        await server.stop(None)


async def test_annotate_rpc_in_step_span(
    telemetry: setup.Telemetry, collector: TraceCollector
) -> None:
    # The current span is the step's SDK span, but the attribute goes to
    # the span of the RPC being served.
    await serve_one_call(StepEcho())
    telemetry.shutdown()
    servers = [span for span in collector.spans() if span.kind == SERVER]
    assert len(servers) == 1
    values = {kv.key: kv.value.string_value for kv in servers[0].attributes}
    assert values.get(JOB) == "job-7", sorted(values)


@pytest.mark.parametrize(
    "tracestate",
    [
        "vendor=abc,not a member",
        ",".join(f"k{index}=v" for index in range(33)),
    ],
    ids=["malformed", "33 members"],
)
async def test_log_line_with_bad_tracestate(
    telemetry: setup.Telemetry,
    collector: TraceCollector,
    trace_log: io.StringIO,
    tracestate: str,
) -> None:
    # The log line reads the span's context while the span is current, so
    # the headers are read then. TraceState logs a warning about this
    # tracestate, and TraceIdFilter reads the context again for that
    # warning: it must find the ids settled, not read the headers again.
    metadata = (("traceparent", TRACEPARENT), ("tracestate", tracestate))
    await serve_one_call(LoggingEcho(), metadata)
    lines = trace_log.getvalue().splitlines()
    served = [line for line in lines if line.endswith(": request served")]
    assert len(served) == 1
    assert served[0].startswith(f"coordinator.review trace_id={CALLER_TRACE_ID} ")
