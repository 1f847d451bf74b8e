"""OTLP protobuf encoding of ``RpcSpan``s, and the span exporter that uses it.

The SDK's OTLP encoder builds a protobuf object per span, attribute and
value, which costs more than recording the span did. ``RpcSpan``s are
written here straight to protobuf wire bytes, field by field, as
opentelemetry/proto/trace/v1/trace.proto numbers them. Other spans take the
SDK's encoder unchanged. The export process of ``observability.relay``
parses the bytes once per batch into the request that the standard
exporter sends.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import Link, SpanContext, TraceState
from opentelemetry.util import types

from observability.rpcspans import RpcSpan, remote_parent
from observability.rpcspans import SpanRecord as PlainRecord

logger = logging.getLogger(__name__)

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64_MASK = (1 << 64) - 1
_ONE_BYTE_VARINTS = [bytes([n]) for n in range(0x80)]
# Span.flags bits: the context's is_remote is known, and it is true.
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
# Attribute keys and span names repeat, so up to _CACHE_LIMIT encoded forms
# of each are kept, and up to _REPEATED_CACHE_LIMIT whole attributes.
_CACHE_LIMIT = 1024
_key_fields: dict[str, bytes] = {}
_name_fields: dict[tuple[str, int], bytes] = {}
_REPEATED_CACHE_LIMIT = 16384
_repeated_attributes: dict[tuple[bytes, str, type, object], bytes] = {}


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE_VARINTS[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """Return a length-delimited field: ``tag``, the payload's length, the payload."""
    return tag + _varint(len(payload)) + payload


def _cached_field(cache: dict[str, bytes], tag: bytes, text: str) -> bytes:
    encoded = cache.get(text)
    if encoded is None:
        encoded = _field(tag, text.encode())
        if len(cache) < _CACHE_LIMIT:
            cache[text] = encoded
    return encoded


def _any_value(value: Any) -> bytes:
    """Encode an AnyValue. Raise ValueError for an int outside int64 or another type."""
    kind = type(value)
    if kind is str:
        return _field(b"\x0a", value.encode())
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"integer {value} does not fit in int64")
        return b"\x18" + _varint(value & _UINT64_MASK)
    if kind is float:
        return b"\x21" + struct.pack("<d", value)
    if value is None:
        return b""
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Mapping):
        entries = b"".join(
            _field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()
        )
        return _field(b"\x32", entries)
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = b"".join(_field(b"\x0a", _any_value(v)) for v in value)
        return _field(b"\x2a", values)
    raise ValueError(f"attribute value {value!r} of type {kind.__name__} is invalid")


def _key_value(key: str, value: Any) -> bytes:
    return _cached_field(_key_fields, b"\x0a", key) + _field(b"\x12", _any_value(value))


def _attributes(tag: bytes, attributes: Mapping[str, types.AttributeValue]) -> bytes:
    """Encode each attribute as a KeyValue field ``tag``, skipping invalid ones.

    String and integer attributes repeat from span to span (the RPC's
    method, a task's id, a checkpoint's id), so their encoded fields are
    kept, keyed by tag, key, type and value.
    """
    fields = []
    for key, value in attributes.items():
        kind = type(value)
        cacheable = kind is str or kind is int
        if cacheable:
            cache_key = (tag, key, kind, value)
            encoded = _repeated_attributes.get(cache_key)
            if encoded is not None:
                fields.append(encoded)
                continue
        try:
            encoded = _field(tag, _key_value(key, value))
        except ValueError as exc:
            logger.warning("attribute %s left out of an exported span: %s", key, exc)
            continue
        if cacheable:
            if len(_repeated_attributes) >= _REPEATED_CACHE_LIMIT:
                # Checkpoint ids only grow, so old entries stop being used
                # and the cache starts afresh.
                _repeated_attributes.clear()
            _repeated_attributes[cache_key] = encoded
        fields.append(encoded)
    return b"".join(fields)


def _trace_state(trace_state: TraceState) -> str:
    return ",".join(f"{key}={value}" for key, value in trace_state.items())


_LOCAL_FLAGS = struct.pack("<I", _HAS_IS_REMOTE)
_REMOTE_FLAGS = struct.pack("<I", _HAS_IS_REMOTE | _IS_REMOTE)
# The last field of a span, its flags (fixed32 field 16), by whether its
# parent is remote.
_LOCAL_END = b"\x85\x01" + _LOCAL_FLAGS
_REMOTE_END = b"\x85\x01" + _REMOTE_FLAGS


def _flags(context: SpanContext | None) -> bytes:
    if context is not None and context.is_remote:
        return _REMOTE_FLAGS
    return _LOCAL_FLAGS


def _event(name: str, timestamp: int, attributes: Mapping[str, Any]) -> bytes:
    dropped = getattr(attributes, "dropped", 0)
    return b"".join(
        (
            b"\x09" + struct.pack("<Q", timestamp),
            _field(b"\x12", name.encode()),
            _attributes(b"\x1a", attributes),
            b"\x20" + _varint(dropped) if dropped else b"",
        )
    )


def _link(link: Link) -> bytes:
    context = link.context
    trace_state = _trace_state(context.trace_state)
    return b"".join(
        (
            b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
            b"\x12\x08" + context.span_id.to_bytes(8, "big"),
            _field(b"\x1a", trace_state.encode()) if trace_state else b"",
            _attributes(b"\x22", link.attributes or {}),
            b"\x28" + _varint(link.dropped_attributes)
            if link.dropped_attributes
            else b"",
            b"\x35" + _flags(context),
        )
    )


def encode_span(span: RpcSpan) -> bytes:
    """Return ``span`` as the bytes of an opentelemetry.proto.trace.v1.Span."""
    parts = [
        b"\x0a\x10",
        span.trace_id.to_bytes(16, "big"),
        b"\x12\x08",
        span.span_id.to_bytes(8, "big"),
    ]

    if span.trace_state:
        parts.append(_field(b"\x1a", _trace_state(span.trace_state).encode()))
    if span.parent is not None:
        parts.append(b"\x22\x08")
        parts.append(span.parent.span_id.to_bytes(8, "big"))

    parts.append(_name_and_kind(span.name, span.kind.value))
    parts.append(_TIMES.pack(0x39, span.start_time, 0x41, span.end_time or 0))
    parts.append(_attributes(b"\x4a", span.attributes))
    if span.dropped_attributes:
        parts.append(b"\x50" + _varint(span.dropped_attributes))

    for name, timestamp, attributes in span.events:
        parts.append(_field(b"\x5a", _event(name, timestamp, attributes)))
    if span.dropped_events:
        parts.append(b"\x60" + _varint(span.dropped_events))
    for link in span.links:
        parts.append(_field(b"\x6a", _link(link)))
    if span.dropped_links:
        parts.append(b"\x70" + _varint(span.dropped_links))

    status = span.status
    parts.append(_status(status.status_code.value, status.description or ""))
    parts.append(_REMOTE_END if span.parent and span.parent.is_remote else _LOCAL_END)
    return b"".join(parts)


# A span as it leaves the coordinator: the ``RpcSpan.record`` of a plain
# span, or the encoded bytes of a span with events, links, a trace state or
# dropped counts.
SpanRecord = PlainRecord | bytes


def span_record(span: RpcSpan) -> SpanRecord:
    """Return the record of an ended ``span``; see ``SpanRecord``."""
    return span.record() if span.plain else encode_span(span)


def encode_record(record: SpanRecord) -> bytes:
    """Return a ``span_record`` as the bytes of a Span, as ``encode_span`` would."""
    if isinstance(record, bytes):
        return record
    (
        trace_field,
        span_id,
        parent_field,
        remote_field,
        name,
        kind,
        start,
        end,
        attributes,
        code,
        message,
    ) = record
    trace_id: int
    parent_id: int
    remote: bool
    trace_state = b""
    if type(trace_field) is str:
        trace_id, parent_id, remote, trace_state = _caller(
            trace_field, parent_field, remote_field
        )
    else:
        trace_id, parent_id, remote = trace_field, parent_field, remote_field
    return b"".join(
        (
            b"\x0a\x10",
            trace_id.to_bytes(16, "big"),
            b"\x12\x08",
            span_id.to_bytes(8, "big"),
            trace_state,
            b"\x22\x08" + parent_id.to_bytes(8, "big") if parent_id else b"",
            _name_and_kind(name, kind),
            _TIMES.pack(0x39, start, 0x41, end),
            _attributes(b"\x4a", attributes),
            _status(code, message),
            _REMOTE_END if remote else _LOCAL_END,
        )
    )


def _caller(
    traceparent: str, tracestate: Any, fallback_trace_id: Any
) -> tuple[int, int, bool, bytes]:
    """Read the caller's headers of a record as ``RpcSpan`` would have.

    Returns the trace id, the parent span id (0 for none), whether there is
    a remote parent and the encoded trace state field.
    """
    parent = remote_parent(traceparent, tracestate)
    if parent is None:
        return fallback_trace_id, 0, False, b""
    state = _trace_state(parent.trace_state) if parent.trace_state else ""
    field = _field(b"\x1a", state.encode()) if state else b""
    return parent.trace_id, parent.span_id, True, field


# The start and end times: a fixed64 field 7 and a fixed64 field 8.
_TIMES = struct.Struct("<BQBQ")


def _name_and_kind(name: str, kind: int) -> bytes:
    """Return the name field and the kind field (SpanKind's value) of a span."""
    encoded = _name_fields.get((name, kind))
    if encoded is None:
        # SpanKind counts from INTERNAL = 0, the protobuf enum from
        # SPAN_KIND_UNSPECIFIED = 0.
        encoded = _field(b"\x2a", name.encode()) + b"\x30" + _varint(kind + 1)
        if len(_name_fields) < _CACHE_LIMIT:
            _name_fields[(name, kind)] = encoded
    return encoded


def _status(code: int, message: str) -> bytes:
    """Return the status field of a span, of StatusCode's value ``code``."""
    if not code:
        # An UNSET status is an empty Status message, as the SDK writes it.
        return b"\x7a\x00"
    text = _field(b"\x12", message.encode()) if message else b""
    return _field(b"\x7a", text + b"\x18" + _varint(code))


# The fields of a ResourceSpans around its spans: the resource, the
# instrumentation scope (inside the ScopeSpans) and the schema URL.
ScopeFields = tuple[bytes, bytes, bytes]


def scope_fields(resource: Resource, scope_name: str) -> ScopeFields:
    """Return the ``ScopeFields`` of spans of ``resource`` under ``scope_name``."""
    schema = resource.schema_url
    return (
        _field(b"\x0a", _attributes(b"\x0a", resource.attributes)),
        _field(b"\x0a", _field(b"\x0a", scope_name.encode())),
        _field(b"\x1a", schema.encode()) if schema else b"",
    )


def _resource_spans(scope: ScopeFields, encoded: Iterable[bytes]) -> bytes:
    resource_field, scope_field, schema_field = scope
    spans = b"".join([_field(b"\x12", span) for span in encoded])
    return resource_field + _field(b"\x12", scope_field + spans) + schema_field


def encode_resource_spans(
    resource: Resource, scope_name: str, spans: Iterable[RpcSpan]
) -> bytes:
    """Return the bytes of a ResourceSpans holding ``spans`` under one scope."""
    encoded = (encode_span(span) for span in spans)
    return _resource_spans(scope_fields(resource, scope_name), encoded)


def encode_request(scope: ScopeFields, records: Sequence[SpanRecord]) -> bytes:
    """Return the bytes of an ExportTraceServiceRequest of ``records``, or b""."""
    if not records:
        return b""
    resource_spans = _resource_spans(scope, map(encode_record, records))
    # Field 1 of the request: one ResourceSpans.
    return _field(b"\x0a", resource_spans)


class EncodedSpans:
    """Spans already encoded as the bytes of an ExportTraceServiceRequest."""

    __slots__ = ("count", "payload")

    def __init__(self, payload: bytes, count: int) -> None:
        self.payload = payload
        self.count = count


class SpanExporter(OTLPSpanExporter):
    """The OTLP/gRPC span exporter, for spans encoded already.

    Requests that follow each other concatenate into one request, so a
    batch of ``EncodedSpans`` is parsed once into the request that the
    standard exporter sends, with its retries, headers and TLS settings.
    """

    @property
    def timeout_s(self) -> float:
        """The time one export may take with its retries, in seconds."""
        return float(self._timeout)

    def _translate_data(self, data: Sequence[Any]) -> ExportTraceServiceRequest:
        return ExportTraceServiceRequest.FromString(
            b"".join(item.payload for item in data)
        )

    def _count_data(self, data: Sequence[Any]) -> int:
        return sum(item.count for item in data)
