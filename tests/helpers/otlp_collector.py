"""An OTLP trace collector on 127.0.0.1 that keeps what it receives."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.trace.v1 import trace_pb2


class TraceCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that keeps every request it was sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.port = 0
        self._received = threading.Condition()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._received:
            self.requests.append(request)
            self._received.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[trace_pb2.Span]:
        return [
            span
            for request in list(self.requests)
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def wait_spans(self, count: int, timeout_s: float = 30.0) -> list[trace_pb2.Span]:
        """Return the spans once at least ``count`` arrived; AssertionError after
        ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._received:
            while len(self.spans()) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"{len(self.spans())} of {count} spans arrived"
                self._received.wait(left)
        return self.spans()


@contextlib.contextmanager
def running_collector() -> Iterator[TraceCollector]:
    """Serve a TraceCollector on a free port of 127.0.0.1 while in the block.

    A thread-pool server, so that exports sent from the test's own process
    are served while the test waits.
    """
    servicer = TraceCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    servicer.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer
    finally:
        server.stop(None)
