"""The coordinator's cheap RPC spans: their OTLP encoding against the SDK's,
their Span semantics and sampling, and an export to a real OTLP collector."""

from __future__ import annotations

import asyncio
import collections
import marshal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
)
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    Span,
    SpanProcessor,
    TracerProvider,
    sampling,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util.types import AttributeValue

from observability import setup
from observability.otlp import (
    EncodedSpans,
    SpanExporter,
    encode_record,
    encode_request,
    encode_resource_spans,
    encode_span,
    scope_fields,
    span_record,
)
from observability.propagation import extract
from observability.rpcspans import RpcSpan, RpcSpanFactory, remote_parent
from observability.settings import TelemetrySettings
from observability.spans import (
    CHECKPOINT,
    JOB,
    RpcRoute,
    annotate_rpc,
    call_traced,
    traced_rpc,
)
from tests.helpers.otlp_collector import TraceCollector

EPOCH = "jobledger.leader.epoch"
SCOPE = "jobledger"
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
RESOURCE = Resource.create(
    {"service.name": "jobledger-test", "service.instance.id": "test:1"}
)
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_ID = 0xB7AD6B7169203331
TRACE_STATE = TraceState([("vendor", "abc"), ("other", "x1")])
REMOTE_PARENT = SpanContext(TRACE_ID, PARENT_ID, True, SAMPLED, TRACE_STATE)
START_NS = 1_700_000_000_000_000_000
END_NS = START_NS + 2_500_000
UNSET = Status(StatusCode.UNSET)


class CollectingProcessor(SpanProcessor):
    """A span processor that keeps every span handed to ``on_end``."""

    def __init__(self) -> None:
        self.ended: list[Any] = []

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)


def make_factory(
    processor: SpanProcessor,
    sampler_name: str = "parentbased_always_on",
    sampler_arg: float = 1.0,
) -> RpcSpanFactory:
    settings = TelemetrySettings(
        service_name="jobledger-test",
        sampler_name=sampler_name,
        sampler_arg=sampler_arg,
    )
    return RpcSpanFactory(
        settings.sampler(),
        settings.sampler_name,
        RandomIdGenerator(),
        processor,
        EPOCH,
        lambda: 7,
    )


def start(
    factory: RpcSpanFactory,
    parent: SpanContext | None = None,
    kind: SpanKind = SpanKind.SERVER,
    attributes: dict[str, AttributeValue] | None = None,
) -> Any:
    return factory.start("/jobledger.Test/Call", kind, parent, dict(attributes or {}))


def rpc_span(parent: SpanContext | None = None) -> RpcSpan:
    span = start(make_factory(CollectingProcessor()), parent)
    assert isinstance(span, RpcSpan)
    return span


# The fidelity tests: each RpcSpan and the ReadableSpan the SDK would have
# made of the same calls, encoded by observability.otlp and by the SDK.

SCALARS: dict[str, AttributeValue] = {
    "text": "checkpoint",
    "flag": True,
    "off": False,
    "small": 42,
    "negative": -5,
    "int64.max": (1 << 63) - 1,
    "int64.min": -(1 << 63),
    "ratio": 0.25,
    "negative.ratio": -1.5e300,
    "names": ("a", "b", "c"),
    "ids": (1, -2, 1 << 40),
    "payload": b"\x00\x01\xff",
}
EVENT_ATTRIBUTES: dict[str, AttributeValue] = {"task": "t-1", "attempt": 3}
LOCAL_LINK = SpanContext(0x1234, 0x5678, False, SAMPLED)
REMOTE_LINK = SpanContext(0xABCDEF, 0x42, True, TraceFlags(TraceFlags.DEFAULT))


def full_rpc_span() -> RpcSpan:
    span = rpc_span(REMOTE_PARENT)
    span.set_attributes(SCALARS)
    span.add_event("barrier", EVENT_ATTRIBUTES, timestamp=START_NS + 10)
    span.add_event("snapshot", None, timestamp=START_NS + 20)
    span.add_link(LOCAL_LINK, {"link.kind": "local", "n": 1})
    span.add_link(REMOTE_LINK, {"link.kind": "remote"})
    span.set_status(Status(StatusCode.ERROR, "checkpoint 5 expired"))
    span.start_time = START_NS
    span.end(END_NS)
    return span


def readable_twin(
    span: RpcSpan,
    parent: SpanContext | None,
    attributes: dict[str, AttributeValue],
    events: tuple[Event, ...] = (),
    links: tuple[Link, ...] = (),
    status: Status = UNSET,
) -> ReadableSpan:
    """Return the SDK span with ``span``'s ids and times and the given contents."""
    trace_state = parent.trace_state if parent is not None else TraceState()
    return ReadableSpan(
        name="/jobledger.Test/Call",
        context=SpanContext(span.trace_id, span.span_id, False, SAMPLED, trace_state),
        parent=parent,
        resource=RESOURCE,
        attributes=attributes,
        events=events,
        links=links,
        kind=SpanKind.SERVER,
        status=status,
        start_time=START_NS,
        end_time=END_NS,
        instrumentation_scope=InstrumentationScope(SCOPE),
    )


def full_readable_twin(span: RpcSpan) -> ReadableSpan:
    return readable_twin(
        span,
        REMOTE_PARENT,
        {EPOCH: 7, **SCALARS},
        events=(
            Event("barrier", EVENT_ATTRIBUTES, timestamp=START_NS + 10),
            Event("snapshot", None, timestamp=START_NS + 20),
        ),
        links=(
            Link(LOCAL_LINK, {"link.kind": "local", "n": 1}),
            Link(REMOTE_LINK, {"link.kind": "remote"}),
        ),
        status=Status(StatusCode.ERROR, "checkpoint 5 expired"),
    )


def ours(span: RpcSpan) -> trace_pb2.ResourceSpans:
    encoded = encode_resource_spans(RESOURCE, SCOPE, [span])
    return trace_pb2.ResourceSpans.FromString(encoded)


def theirs(readable: ReadableSpan) -> trace_pb2.ResourceSpans:
    request = encode_spans([readable])
    assert len(request.resource_spans) == 1
    return request.resource_spans[0]


def only_span(resource_spans: trace_pb2.ResourceSpans) -> trace_pb2.Span:
    assert len(resource_spans.scope_spans) == 1
    assert len(resource_spans.scope_spans[0].spans) == 1
    return resource_spans.scope_spans[0].spans[0]


def test_encoding_full_span_matches_sdk() -> None:
    span = full_rpc_span()
    expected = only_span(theirs(full_readable_twin(span)))
    assert only_span(ours(span)) == expected


def test_encoding_full_span_fields() -> None:
    encoded = only_span(ours(full_rpc_span()))
    assert encoded.parent_span_id == PARENT_ID.to_bytes(8, "big")
    assert encoded.trace_state == "vendor=abc,other=x1"
    assert encoded.flags == 0x300
    assert encoded.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert encoded.status.message == "checkpoint 5 expired"
    assert len(encoded.events) == 2
    assert len(encoded.links) == 2
    assert encoded.links[0].flags == 0x100
    assert encoded.links[1].flags == 0x300


def test_encoding_attribute_values() -> None:
    encoded = only_span(ours(full_rpc_span()))
    values = {kv.key: kv.value for kv in encoded.attributes}
    assert values["int64.min"].int_value == -(1 << 63)
    assert values["int64.max"].int_value == (1 << 63) - 1
    assert values["negative"].int_value == -5
    assert values["negative.ratio"].double_value == -1.5e300
    assert values["payload"].bytes_value == b"\x00\x01\xff"
    assert [v.string_value for v in values["names"].array_value.values] == [
        "a",
        "b",
        "c",
    ]
    assert values[EPOCH].int_value == 7


def test_encoding_resource_and_scope_match_sdk() -> None:
    span = full_rpc_span()
    expected = theirs(full_readable_twin(span))
    actual = ours(span)
    assert actual.resource == expected.resource
    assert actual.schema_url == expected.schema_url
    assert actual.scope_spans[0].scope == expected.scope_spans[0].scope
    assert actual.scope_spans[0].schema_url == expected.scope_spans[0].schema_url


def test_encoding_root_span_matches_sdk() -> None:
    span = rpc_span()
    span.set_attribute("rpc.method", "Call")
    span.start_time = START_NS
    span.end(END_NS)
    twin = readable_twin(span, None, {EPOCH: 7, "rpc.method": "Call"})
    assert only_span(ours(span)) == only_span(theirs(twin))


def test_encoding_root_span_has_no_parent() -> None:
    span = rpc_span()
    span.end(END_NS)
    encoded = only_span(ours(span))
    assert encoded.parent_span_id == b""
    assert encoded.flags == 0x100
    assert encoded.trace_state == ""


def test_encoding_unset_status_matches_sdk() -> None:
    local_parent = SpanContext(TRACE_ID, PARENT_ID, False, SAMPLED)
    span = rpc_span(local_parent)
    span.start_time = START_NS
    span.end(END_NS)
    twin = readable_twin(span, local_parent, {EPOCH: 7})
    encoded = only_span(ours(span))
    assert encoded == only_span(theirs(twin))
    assert encoded.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    assert encoded.flags == 0x100


def test_encoding_mapping_attribute_matches_sdk() -> None:
    span = rpc_span()
    limits: dict[str, AttributeValue] = {"max": 3, "name": "x"}
    span.set_attribute("limits", limits)
    span.start_time = START_NS
    span.end(END_NS)
    twin = readable_twin(span, None, {EPOCH: 7, "limits": dict(limits)})
    assert only_span(ours(span)) == only_span(theirs(twin))


def test_encoding_dropped_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "2")
    monkeypatch.setenv("OTEL_SPAN_EVENT_COUNT_LIMIT", "1")
    monkeypatch.setenv("OTEL_SPAN_LINK_COUNT_LIMIT", "1")
    span = rpc_span()
    span.set_attributes({"a": 1, "b": 2, "c": 3})
    span.add_event("kept", None, timestamp=START_NS)
    span.add_event("dropped", None, timestamp=START_NS)
    span.add_link(LOCAL_LINK)
    span.add_link(REMOTE_LINK)
    span.end(END_NS)
    encoded = only_span(ours(span))
    assert encoded.dropped_attributes_count == 2
    assert encoded.dropped_events_count == 1
    assert encoded.dropped_links_count == 1


def test_encoding_link_trace_state() -> None:
    # The SDK's encoder leaves Link.trace_state (field 3) out; this one writes it.
    span = rpc_span()
    span.add_link(SpanContext(0x1234, 0x5678, True, SAMPLED, TRACE_STATE))
    span.end(END_NS)
    link = only_span(ours(span)).links[0]
    assert link.trace_state == "vendor=abc,other=x1"
    assert link.flags == 0x300


# Span records: what the coordinator hands to its export process, encoded
# there as encode_span would have encoded the span.


def ended(span: RpcSpan) -> RpcSpan:
    span.end(END_NS)
    return span


def record_cases() -> list[RpcSpan]:
    failed = rpc_span()
    failed.set_status(Status(StatusCode.ERROR, "checkpoint 5 expired"))
    ok = rpc_span(SpanContext(TRACE_ID, PARENT_ID, False, SAMPLED))
    ok.set_status(StatusCode.OK)
    annotated = rpc_span()
    annotated.set_attributes(SCALARS)
    annotated.set_attribute("sequence", ("a", "b"))
    return [ended(span) for span in (rpc_span(), failed, ok, annotated)]


@pytest.mark.parametrize("index", range(4))
def test_record_encodes_as_the_span(index: int) -> None:
    span = record_cases()[index]
    record = span_record(span)
    assert isinstance(record, tuple)
    assert encode_record(record) == encode_span(span)


def test_record_survives_marshal() -> None:
    records = [span_record(span) for span in record_cases()]
    assert marshal.loads(marshal.dumps(records)) == records


def test_record_remote_parent_flags() -> None:
    span = rpc_span(SpanContext(TRACE_ID, PARENT_ID, True, SAMPLED))
    encoded = trace_pb2.Span.FromString(encode_record(span_record(ended(span))))
    assert encoded.parent_span_id == PARENT_ID.to_bytes(8, "big")
    assert encoded.flags == 0x300


def test_record_of_full_span_encoded() -> None:
    # Events, links, a trace state and dropped counts are encoded at once.
    span = full_rpc_span()
    assert span_record(span) == encode_span(span)
    assert encode_record(span_record(span)) == encode_span(span)


def test_request_matches_resource_spans() -> None:
    spans = record_cases()
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(
        encode_request(scope_fields(RESOURCE, SCOPE), [span_record(s) for s in spans])
    )
    expected = trace_pb2.ResourceSpans.FromString(
        encode_resource_spans(RESOURCE, SCOPE, spans)
    )
    assert list(request.resource_spans) == [expected]
    assert request.resource_spans[0].resource == theirs(sdk_spans(1)[0]).resource


def test_request_of_no_records_is_empty() -> None:
    assert encode_request(scope_fields(RESOURCE, SCOPE), []) == b""


@pytest.fixture
def exporter() -> Iterator[SpanExporter]:
    # Nothing is sent: only the request is built, so the endpoint is never
    # connected to.
    exporter = SpanExporter(endpoint="http://127.0.0.1:9", insecure=True)
    yield exporter
    exporter.shutdown()


def sdk_spans(count: int) -> list[ReadableSpan]:
    processor = CollectingProcessor()
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("jobledger.test")
    for index in range(count):
        with tracer.start_as_current_span(f"sdk-{index}") as span:
            span.set_attribute("index", index)
    provider.shutdown()
    return list(processor.ended)


def span_ids(request: trace_service_pb2.ExportTraceServiceRequest) -> list[int]:
    return [
        int.from_bytes(span.span_id, "big")
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]


def test_exporter_joins_encoded_batches(exporter: SpanExporter) -> None:
    rpc = record_cases()
    sdk = sdk_spans(2)
    first = encode_request(scope_fields(RESOURCE, SCOPE), [span_record(rpc[0])])
    second = encode_request(
        scope_fields(RESOURCE, SCOPE), [span_record(s) for s in rpc[1:]]
    )
    third = encode_spans(sdk).SerializeToString()
    batch = [EncodedSpans(first, 1), EncodedSpans(second, 3), EncodedSpans(third, 2)]
    request = exporter._translate_data(batch)
    expected = [s.get_span_context().span_id for s in rpc]
    expected += [s.get_span_context().span_id for s in sdk]
    assert sorted(span_ids(request)) == sorted(expected)
    scopes = collections.Counter(
        scope_spans.scope.name
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for _ in scope_spans.spans
    )
    assert scopes == {SCOPE: 4, "jobledger.test": 2}
    assert exporter._count_data(batch) == 6


# The traceparent of a served call, parsed as the W3C propagator does.

VALID_IDS = "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"
TRACEPARENTS = {
    "valid": f"00-{VALID_IDS}-01",
    "unsampled": f"00-{VALID_IDS}-00",
    "other flags": f"00-{VALID_IDS}-09",
    "blanks around": f" \t00-{VALID_IDS}-01\t ",
    "later version, more fields": f"01-{VALID_IDS}-01-extra",
    "version 00, more fields": f"00-{VALID_IDS}-01-extra",
    "version ff": f"ff-{VALID_IDS}-01",
    "upper case": f"00-{VALID_IDS.upper()}-01",
    "zero trace id": f"00-{'0' * 32}-b7ad6b7169203331-01",
    "zero span id": f"00-0af7651916cd43dd8448eb211c80319c-{'0' * 16}-01",
    "short trace id": f"00-{VALID_IDS[1:]}-01",
    "hex prefix": f"00-0x{VALID_IDS[2:]}-01",
    "underscore": "00-0af7651916cd43dd8448eb211c80_19c-b7ad6b7169203331-01",
    "empty": "",
    "junk": "not-a-traceparent",
    "longer than 512": f"01-{VALID_IDS}-01-{'a' * 500}",
    "55 characters, upper-case flags": f"00-{VALID_IDS}-0A",
    "55 characters, blank in the id": f"00- {VALID_IDS[1:]}-01",
    "55 characters, sign in the id": f"00-+{VALID_IDS[1:]}-01",
    "55 characters, version 01": f"01-{VALID_IDS}-01",
    "55 characters, dash misplaced": f"00-{VALID_IDS[:31]}-{VALID_IDS[32:]}01",
}


@pytest.mark.parametrize("name", TRACEPARENTS)
@pytest.mark.parametrize("trace_state", ["", "vendor=abc,other=x1"])
def test_remote_parent_as_propagator(name: str, trace_state: str) -> None:
    carrier = {"traceparent": TRACEPARENTS[name]}
    if trace_state:
        carrier["tracestate"] = trace_state
    expected = trace.get_current_span(extract(carrier)).get_span_context()
    parsed = remote_parent(carrier["traceparent"], carrier.get("tracestate"))
    if not expected.is_valid:
        assert parsed is None
        return
    assert parsed is not None
    assert parsed.span_context() == expected
    assert parsed.span_context().trace_state == expected.trace_state


def test_remote_parent_long_tracestate_dropped() -> None:
    long_state = ",".join(f"k{index}=" + "v" * 200 for index in range(41))
    carrier = {"traceparent": TRACEPARENTS["valid"], "tracestate": long_state}
    expected = trace.get_current_span(extract(carrier)).get_span_context()
    parsed = remote_parent(carrier["traceparent"], long_state)
    assert parsed is not None
    assert parsed.span_context() == expected
    assert parsed.trace_state is None


def test_remote_parent_rejects_bytes() -> None:
    assert remote_parent(b"00-" + VALID_IDS.encode() + b"-01", None) is None


# The SERVER span of a served call: the caller's traceparent read at once,
# or kept as it came and read later, in the process or in the export process.


def served(traceparent: str, tracestate: str | None = None) -> Any:
    factory = make_factory(CollectingProcessor())
    return factory.start_served("/jobledger.Test/Call", traceparent, tracestate, {})


@pytest.mark.parametrize("name", TRACEPARENTS)
@pytest.mark.parametrize("trace_state", ["", "vendor=abc,other=x1"])
def test_served_parent_as_propagator(name: str, trace_state: str) -> None:
    carrier = {"traceparent": TRACEPARENTS[name]}
    if trace_state:
        carrier["tracestate"] = trace_state
    expected = trace.get_current_span(extract(carrier)).get_span_context()

    span = served(carrier["traceparent"], carrier.get("tracestate"))
    if expected.is_valid and not expected.trace_flags.sampled:
        assert isinstance(span, NonRecordingSpan)
        assert span.get_span_context().trace_id == expected.trace_id
        return
    assert isinstance(span, RpcSpan)
    span.end(END_NS)

    # As the export process gets it: the header possibly still unread.
    exported = trace_pb2.Span.FromString(encode_record(span_record(span)))
    # Then read in the process.
    context = span.get_span_context()
    assert exported == trace_pb2.Span.FromString(encode_span(span))
    assert exported.trace_id == context.trace_id.to_bytes(16, "big")
    assert exported.span_id == context.span_id.to_bytes(8, "big")

    if expected.is_valid:
        assert context.trace_id == expected.trace_id
        assert context.trace_state == expected.trace_state
        assert span.parent is not None
        assert span.parent.span_id == expected.span_id
        assert exported.parent_span_id == expected.span_id.to_bytes(8, "big")
        assert exported.trace_state == ",".join(
            f"{key}={value}" for key, value in expected.trace_state.items()
        )
        assert exported.flags == 0x300
    else:
        assert context.trace_id != 0
        assert span.parent is None
        assert exported.parent_span_id == b""
        assert exported.trace_state == ""
        assert exported.flags == 0x100


@pytest.mark.parametrize("trace_state", [None, "vendor=abc"])
def test_served_sampled_header_left_unread(trace_state: str | None) -> None:
    header = TRACEPARENTS["valid"]
    span = served(header, trace_state)
    span.end(END_NS)
    record = span_record(span)
    assert isinstance(record, tuple)
    assert record[0] == header
    assert record[2] == trace_state
    assert marshal.loads(marshal.dumps(record)) == record


def test_served_invalid_header_keeps_one_trace_id() -> None:
    # An invalid header read in the process and in the export process gives
    # the span the same trace id of its own.
    span = served(TRACEPARENTS["55 characters, sign in the id"])
    span.end(END_NS)
    exported = trace_pb2.Span.FromString(encode_record(span_record(span)))
    assert exported.parent_span_id == b""
    assert exported.trace_id == span.get_span_context().trace_id.to_bytes(16, "big")


def test_served_header_read_once() -> None:
    span = served(TRACEPARENTS["valid"], "vendor=abc")
    assert span.trace_id == TRACE_ID
    assert span.parent is not None
    assert span.parent.span_id == PARENT_ID
    assert span.trace_state == TraceState([("vendor", "abc")])
    # Read in the process, the span has a trace state: it is encoded whole.
    span.end(END_NS)
    assert span_record(span) == encode_span(span)


# RpcSpan semantics.


def test_span_invalid_value_dropped() -> None:
    span = rpc_span()
    span.set_attribute("bad", object())  # type: ignore[arg-type]
    span.set_attribute("none", None)
    assert "bad" not in span.attributes
    assert "none" not in span.attributes


def test_span_empty_key_dropped() -> None:
    span = rpc_span()
    before = dict(span.attributes)
    span.set_attribute("", "value")
    span.set_attribute("", 3)
    assert span.attributes == before


def test_span_sequences_kept_as_tuples() -> None:
    span = rpc_span()
    span.set_attribute("names", ["a", "b"])
    span.set_attribute("ids", [1, 2])
    assert span.attributes["names"] == ("a", "b")
    assert span.attributes["ids"] == (1, 2)


def test_span_attribute_count_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "3")
    span = rpc_span()
    for key in ("a", "b", "c", "d"):
        span.set_attribute(key, 1)
    span.set_attribute("a", 2)
    assert list(span.attributes) == [EPOCH, "a", "b"]
    assert span.attributes["a"] == 2
    assert span.dropped_attributes == 2


def test_span_count_limit_covers_start_attributes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "2")
    span = start(
        make_factory(CollectingProcessor()),
        attributes={"rpc.system": "grpc", "rpc.service": "S", "rpc.method": "M"},
    )
    assert len(span.attributes) == 2
    assert span.dropped_attributes == 2


def test_span_length_limit_covers_start_attributes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "4")
    span = start(
        make_factory(CollectingProcessor()), attributes={"rpc.service": "abcdefgh"}
    )
    assert span.attributes["rpc.service"] == "abcd"


@pytest.mark.parametrize(
    "variable",
    ["OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT"],
)
def test_span_value_length_limit(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "4")
    span = rpc_span()
    span.set_attribute("text", "abcdefgh")
    span.set_attribute("names", ("abcdefgh", "xy"))
    span.set_attribute("count", 123456789)
    assert span.attributes["text"] == "abcd"
    assert span.attributes["names"] == ("abcd", "xy")
    assert span.attributes["count"] == 123456789


def test_span_changes_after_end_ignored() -> None:
    span = rpc_span()
    span.end(END_NS)
    span.set_attribute("late", "x")
    span.add_event("late")
    span.add_link(LOCAL_LINK)
    span.set_status(StatusCode.ERROR, "late")
    span.update_name("late")
    span.end(END_NS + 1)
    assert "late" not in span.attributes
    assert span.events == ()
    assert span.links == ()
    assert span.status.status_code is StatusCode.UNSET
    assert span.name == "/jobledger.Test/Call"
    assert span.end_time == END_NS


def test_span_end_twice_reaches_processor_once() -> None:
    processor = CollectingProcessor()
    span = start(make_factory(processor))
    span.end()
    span.end()
    assert processor.ended == [span]


def test_span_ok_status_is_final() -> None:
    span = rpc_span()
    span.set_status(StatusCode.OK)
    span.set_status(Status(StatusCode.ERROR, "later"))
    span.set_status(StatusCode.ERROR, "later")
    assert span.status.status_code is StatusCode.OK


def test_span_error_description_kept() -> None:
    span = rpc_span()
    span.set_status(StatusCode.ERROR, "task t-1 failed")
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "task t-1 failed"


def test_span_unset_status_ignored() -> None:
    span = rpc_span()
    span.set_status(StatusCode.ERROR, "failed")
    span.set_status(StatusCode.UNSET)
    assert span.status.status_code is StatusCode.ERROR


def test_span_record_exception_event() -> None:
    span = rpc_span()
    try:
        raise ValueError("checkpoint 5 not found")
    except ValueError as exc:
        span.record_exception(exc, {"jobledger.job.id": "job-1"}, timestamp=START_NS)
    assert len(span.events) == 1
    name, timestamp, attributes = span.events[0]
    assert name == "exception"
    assert timestamp == START_NS
    assert attributes["exception.type"] == "ValueError"
    assert attributes["exception.message"] == "checkpoint 5 not found"
    assert "checkpoint 5 not found" in str(attributes["exception.stacktrace"])
    assert attributes["jobledger.job.id"] == "job-1"


def test_span_update_name() -> None:
    span = rpc_span()
    span.update_name("/jobledger.Test/Renamed")
    span.end()
    assert span.name == "/jobledger.Test/Renamed"


def test_span_is_recording_until_end() -> None:
    span = rpc_span()
    recording = span.is_recording()
    span.end()
    assert recording
    assert not span.is_recording()


def test_span_context_sampled_with_ids() -> None:
    span = rpc_span(REMOTE_PARENT)
    context = span.get_span_context()
    assert context.trace_flags.sampled
    assert context.trace_id == span.trace_id == TRACE_ID
    assert context.span_id == span.span_id
    assert context.span_id != PARENT_ID
    assert not context.is_remote
    assert context.trace_state == TRACE_STATE


# Sampling in RpcSpanFactory.start.

UNSAMPLED_PARENT = SpanContext(
    TRACE_ID, PARENT_ID, True, TraceFlags(TraceFlags.DEFAULT), TRACE_STATE
)


def test_sampling_default_root_sampled() -> None:
    processor = CollectingProcessor()
    span = start(make_factory(processor))
    span.end()
    assert isinstance(span, RpcSpan)
    assert span.get_span_context().trace_id != 0
    assert processor.ended == [span]


def test_sampling_default_sampled_parent() -> None:
    span = start(make_factory(CollectingProcessor()), REMOTE_PARENT)
    assert isinstance(span, RpcSpan)
    assert span.trace_id == TRACE_ID
    assert span.parent == REMOTE_PARENT
    assert span.get_span_context().trace_state == TRACE_STATE


def test_sampling_default_unsampled_parent() -> None:
    processor = CollectingProcessor()
    span = start(make_factory(processor), UNSAMPLED_PARENT)
    span.set_attribute("ignored", 1)
    span.end()
    context = span.get_span_context()
    assert isinstance(span, NonRecordingSpan)
    assert not span.is_recording()
    assert context.trace_id == TRACE_ID
    assert context.span_id != PARENT_ID
    assert not context.trace_flags.sampled
    assert context.trace_state == TRACE_STATE
    assert processor.ended == []


@pytest.mark.parametrize(
    ("sampler_name", "sampler_arg"),
    [("always_off", 1.0), ("traceidratio", 0.0), ("parentbased_always_off", 1.0)],
)
def test_sampling_drops_root(sampler_name: str, sampler_arg: float) -> None:
    processor = CollectingProcessor()
    span = start(make_factory(processor, sampler_name, sampler_arg))
    span.end()
    assert isinstance(span, NonRecordingSpan)
    assert span.get_span_context().is_valid
    assert not span.get_span_context().trace_flags.sampled
    assert processor.ended == []


def test_sampling_always_on_unsampled_parent() -> None:
    processor = CollectingProcessor()
    span = start(make_factory(processor, "always_on"), UNSAMPLED_PARENT)
    span.end()
    assert isinstance(span, RpcSpan)
    assert span.trace_id == TRACE_ID
    assert span.get_span_context().trace_state == TRACE_STATE
    assert processor.ended == [span]


def test_sampling_ratio_one_samples_root() -> None:
    span = start(make_factory(CollectingProcessor(), "parentbased_traceidratio"))
    assert isinstance(span, RpcSpan)


def test_sampling_builtin_adds_no_attributes() -> None:
    start_attributes: dict[str, AttributeValue] = {"rpc.method": "Call"}
    factory = make_factory(CollectingProcessor(), "always_on")
    span = start(factory, attributes=start_attributes)
    assert span.attributes == {"rpc.method": "Call", EPOCH: 7}


class LabellingSampler(sampling.Sampler):
    """A sampler that samples every span and adds one attribute."""

    def should_sample(self, *args: Any, **kwargs: Any) -> sampling.SamplingResult:
        return sampling.SamplingResult(
            sampling.Decision.RECORD_AND_SAMPLE, {"sampler.rule": "all"}
        )

    def get_description(self) -> str:
        return "LabellingSampler"


def test_sampling_sampler_attributes_added() -> None:
    factory = RpcSpanFactory(
        LabellingSampler(),
        "labelling",
        RandomIdGenerator(),
        CollectingProcessor(),
        EPOCH,
        lambda: 7,
    )
    span = start(factory, attributes={"rpc.method": "Call"})
    assert span.attributes["sampler.rule"] == "all"
    assert span.attributes["rpc.method"] == "Call"


# End to end: traced_rpc and call_traced exported to a real OTLP collector.

SERVICE = "jobledger.test.Echo"
METHOD = "Echo"
ROUTE = RpcRoute(SERVICE, METHOD)


class EchoServer:
    """A grpc.aio server whose one method is served through traced_rpc."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        # The current span context inside each call, when read_current.
        self.read_current = False
        self.current: list[SpanContext] = []
        self.handled = 0
        self.server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(self.handle)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.echo = self.channel.unary_unary(f"/{SERVICE}/{METHOD}")

    async def handle(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.metadata.append(
            {key: str(value) for key, value in context.invocation_metadata() or ()}
        )
        assert setup.rpc_spans_for(SERVICE) is not None
        try:
            return await TRACED_ECHO(self, request, context)
        finally:
            self.handled += 1

    async def answer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if self.read_current:
            self.current.append(trace.get_current_span().get_span_context())
        annotate_rpc({JOB: "job-1", CHECKPOINT: 5, "jobledger.phase": "echo"})
        if request == b"abort":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not now")
        return request

    async def wait_handled(self, count: int) -> None:
        """Wait until ``count`` calls have left the handler, so their spans ended.

        An aborting handler sends its status from context.abort, before the
        traced handler ends the span, so the client can see the error first.
        """
        deadline = time.monotonic() + 60
        while self.handled < count:
            assert time.monotonic() < deadline, self.handled
            await asyncio.sleep(0.01)

    def call(self, request: bytes) -> Callable[[Any], Awaitable[bytes]]:
        async def invoke(metadata: Any) -> bytes:
            return await self.echo(request, metadata=metadata, timeout=60)  # type: ignore[no-any-return]

        return invoke


TRACED_ECHO = traced_rpc(ROUTE, EchoServer.answer)


@pytest.fixture
async def echo() -> Any:
    server = EchoServer()
    await server.server.start()
    yield server
    await server.channel.close()
    await server.server.stop(None)


def by_kind(spans: list[trace_pb2.Span], kind: int) -> trace_pb2.Span:
    matching = [span for span in spans if span.kind == kind]
    assert len(matching) == 1, spans
    return matching[0]


def attribute(span: trace_pb2.Span, key: str) -> common_pb2.AnyValue:
    values = [kv.value for kv in span.attributes if kv.key == key]
    assert len(values) == 1, (key, span.attributes)
    return values[0]


CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
SERVER = trace_pb2.Span.SPAN_KIND_SERVER


async def test_export_flushed_by_shutdown(
    telemetry: setup.Telemetry, collector: TraceCollector, echo: EchoServer
) -> None:
    reply = await call_traced(SERVICE, METHOD, echo.call(b"hello"), ())
    await echo.wait_handled(1)
    telemetry.shutdown()
    spans = collector.spans()
    assert reply == b"hello"
    assert len(spans) == 2
    assert {span.name for span in spans} == {f"/{SERVICE}/{METHOD}"}


async def test_export_traceparent_names_client_span(
    telemetry: setup.Telemetry, collector: TraceCollector, echo: EchoServer
) -> None:
    await call_traced(SERVICE, METHOD, echo.call(b"hello"), (("x-caller", "test"),))
    await echo.wait_handled(1)
    telemetry.shutdown()
    client = by_kind(collector.spans(), CLIENT)
    received = echo.metadata[0]
    expected = f"00-{client.trace_id.hex()}-{client.span_id.hex()}-01"
    assert received["traceparent"] == expected
    assert received["x-caller"] == "test"


async def test_export_server_child_of_client(
    telemetry: setup.Telemetry, collector: TraceCollector, echo: EchoServer
) -> None:
    await call_traced(SERVICE, METHOD, echo.call(b"hello"), ())
    await echo.wait_handled(1)
    telemetry.shutdown()
    spans = collector.spans()
    client = by_kind(spans, CLIENT)
    server = by_kind(spans, SERVER)
    assert server.trace_id == client.trace_id
    assert server.parent_span_id == client.span_id
    assert server.flags == 0x300
    assert client.parent_span_id == b""


async def test_export_server_root_without_traceparent(
    telemetry: setup.Telemetry, collector: TraceCollector, echo: EchoServer
) -> None:
    await echo.call(b"hello")(())
    await echo.wait_handled(1)
    telemetry.shutdown()
    server = by_kind(collector.spans(), SERVER)
    assert server.parent_span_id == b""
    assert server.flags == 0x100


async def test_export_annotations_arrive(
    telemetry: setup.Telemetry, collector: TraceCollector, echo: EchoServer
) -> None:
    await call_traced(SERVICE, METHOD, echo.call(b"hello"), ())
    await echo.wait_handled(1)
    telemetry.shutdown()
    server = by_kind(collector.spans(), SERVER)
    assert attribute(server, "jobledger.job.id").string_value == "job-1"
    assert attribute(server, "jobledger.checkpoint.id").int_value == 5
    assert attribute(server, "jobledger.phase").string_value == "echo"
    assert attribute(server, "rpc.method").string_value == METHOD
    assert attribute(server, EPOCH).int_value == 0
    assert attribute(server, "rpc.grpc.status_code").int_value == 0
    client = by_kind(collector.spans(), CLIENT)
    assert attribute(client, "rpc.grpc.status_code").int_value == 0


async def test_export_abort_sets_error(
    telemetry: setup.Telemetry, collector: TraceCollector, echo: EchoServer
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call_traced(SERVICE, METHOD, echo.call(b"abort"), ())
    await echo.wait_handled(1)
    telemetry.shutdown()
    server = by_kind(collector.spans(), SERVER)
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert server.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    # The status code's number, as the semantic conventions give it.
    assert attribute(server, "rpc.grpc.status_code").int_value == 9
    assert "not now" in server.status.message


async def test_export_abort_sets_client_error(
    telemetry: setup.Telemetry, collector: TraceCollector, echo: EchoServer
) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await call_traced(SERVICE, METHOD, echo.call(b"abort"), ())
    await echo.wait_handled(1)
    telemetry.shutdown()
    client = by_kind(collector.spans(), CLIENT)
    assert client.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    # The status code's number, as the semantic conventions give it.
    assert attribute(client, "rpc.grpc.status_code").int_value == 9
    assert client.status.message == "FAILED_PRECONDITION: not now"


# Whether a call reads its span's context (as a log line does) or not, the
# caller's headers are read the same, in the process or in the export process.


@pytest.mark.parametrize("read_current", [False, True])
@pytest.mark.parametrize("trace_state", ["", "vendor=abc,other=x1"])
async def test_export_server_child_of_caller_headers(
    telemetry: setup.Telemetry,
    collector: TraceCollector,
    echo: EchoServer,
    trace_state: str,
    read_current: bool,
) -> None:
    echo.read_current = read_current
    metadata = [("traceparent", TRACEPARENTS["valid"])]
    if trace_state:
        metadata.append(("tracestate", trace_state))
    await echo.call(b"hello")(tuple(metadata))
    await echo.wait_handled(1)
    telemetry.shutdown()
    server = by_kind(collector.spans(), SERVER)
    assert server.trace_id == TRACE_ID.to_bytes(16, "big")
    assert server.parent_span_id == PARENT_ID.to_bytes(8, "big")
    assert server.trace_state == trace_state
    assert server.flags == 0x300
    if read_current:
        (current,) = echo.current
        assert current.trace_id == TRACE_ID
        assert server.span_id == current.span_id.to_bytes(8, "big")


@pytest.mark.parametrize("read_current", [False, True])
async def test_export_server_root_of_invalid_header(
    telemetry: setup.Telemetry,
    collector: TraceCollector,
    echo: EchoServer,
    read_current: bool,
) -> None:
    echo.read_current = read_current
    header = TRACEPARENTS["55 characters, sign in the id"]
    await echo.call(b"hello")((("traceparent", header),))
    await echo.call(b"hello")((("traceparent", header),))
    await echo.wait_handled(2)
    telemetry.shutdown()
    servers = [span for span in collector.spans() if span.kind == SERVER]
    assert [span.parent_span_id for span in servers] == [b"", b""]
    assert [span.flags for span in servers] == [0x100, 0x100]
    # Each the root of a trace of its own: the one the call saw as current.
    trace_ids = {span.trace_id for span in servers}
    assert len(trace_ids) == 2
    if read_current:
        assert trace_ids == {c.trace_id.to_bytes(16, "big") for c in echo.current}
