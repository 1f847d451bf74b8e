"""OTLP protobuf encoding of ``RpcSpan``s, and the span exporter that uses it.

The SDK's OTLP encoder builds a protobuf object per span, attribute and
value, which costs more than recording the span did. ``RpcSpan``s are
written here straight to protobuf wire bytes, field by field, as
opentelemetry/proto/trace/v1/trace.proto numbers them. The bytes are parsed
once per export batch into the request that the standard exporter sends.
Other spans take the SDK's encoder unchanged.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import Link, SpanContext, SpanKind, StatusCode, TraceState
from opentelemetry.util import types

from observability.rpcspans import RpcSpan

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
_name_fields: dict[tuple[str, SpanKind], bytes] = {}
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

    parts.append(_name_and_kind(span.name, span.kind))
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

    if span.status.status_code is StatusCode.UNSET:
        # An UNSET status is an empty Status message, as the SDK writes it.
        parts.append(b"\x7a\x00")
    else:
        parts.append(_field(b"\x7a", _status(span)))
    parts.append(b"\x85\x01")
    parts.append(_flags(span.parent))
    return b"".join(parts)


# The start and end times: a fixed64 field 7 and a fixed64 field 8.
_TIMES = struct.Struct("<BQBQ")


def _name_and_kind(name: str, kind: SpanKind) -> bytes:
    """Return the name field and the kind field of a span."""
    encoded = _name_fields.get((name, kind))
    if encoded is None:
        # SpanKind counts from INTERNAL = 0, the protobuf enum from
        # SPAN_KIND_UNSPECIFIED = 0.
        encoded = _field(b"\x2a", name.encode()) + b"\x30" + _varint(kind.value + 1)
        if len(_name_fields) < _CACHE_LIMIT:
            _name_fields[(name, kind)] = encoded
    return encoded


def _status(span: RpcSpan) -> bytes:
    status = span.status
    message = status.description or ""
    text = _field(b"\x12", message.encode()) if message else b""
    return text + b"\x18" + _varint(status.status_code.value)


def encode_resource_spans(
    resource: Resource, scope_name: str, spans: Iterable[RpcSpan]
) -> bytes:
    """Return the bytes of a ResourceSpans holding ``spans`` under one scope."""
    scope = _field(b"\x0a", _field(b"\x0a", scope_name.encode()))
    encoded = b"".join(_field(b"\x12", encode_span(span)) for span in spans)
    body = [
        _field(b"\x0a", _attributes(b"\x0a", resource.attributes)),
        _field(b"\x12", scope + encoded),
    ]
    if resource.schema_url:
        body.append(_field(b"\x1a", resource.schema_url.encode()))
    return b"".join(body)


class SpanExporter(OTLPSpanExporter):
    """The OTLP/gRPC span exporter, with ``RpcSpan``s encoded by this module.

    ``resource`` and ``scope_name`` are those of the tracer that the
    ``RpcSpan``s stand in for.
    """

    def __init__(self, resource: Resource, scope_name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._resource = resource
        self._scope_name = scope_name

    @property
    def timeout_s(self) -> float:
        """The time one export may take with its retries, in seconds."""
        return float(self._timeout)

    def _translate_data(self, data: Sequence[Any]) -> ExportTraceServiceRequest:
        # type() rather than isinstance(): RpcSpan derives from an ABC, whose
        # isinstance check costs a Python call per span.
        rpc_spans: list[RpcSpan] = [s for s in data if type(s) is RpcSpan]
        if not rpc_spans:
            return encode_spans(data)
        other = [s for s in data if type(s) is not RpcSpan]
        request = encode_spans(other)
        encoded = encode_resource_spans(self._resource, self._scope_name, rpc_spans)
        request.resource_spans.add().MergeFromString(encoded)
        return request
