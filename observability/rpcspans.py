"""Spans of the coordinator's RPCs, recorded at a fraction of the SDK's cost.

The coordinator makes one span per RPC it serves, and AcknowledgeCheckpoint
alone arrives thousands of times a second. The SDK's span takes a lock and
validates each attribute through several layers of calls, and the OTLP
exporter then builds a protobuf object per span, attribute and value. A
``RpcSpan`` keeps its attributes in a plain dict, checks the common types
inline, and is written to OTLP wire bytes by ``observability.otlp``.

It implements the whole ``opentelemetry.trace.Span`` API: attributes,
events, links, status and exceptions. It honours the sampler that
OTEL_TRACES_SAMPLER configures and the limits of ``SpanLimits``. It ends
into the same span processor as every other span, so export settings,
queue limits and shutdown apply to it unchanged.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Callable, Mapping
from random import getrandbits
from time import time_ns
from typing import Any

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, sampling
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
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
from opentelemetry.util import types

logger = logging.getLogger(__name__)

_SCALARS = (str, bool, int, float)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_UNSET = Status(StatusCode.UNSET)
_UNSET_VALUE = StatusCode.UNSET.value
_SERVER = SpanKind.SERVER
_SERVER_VALUE = SpanKind.SERVER.value
_CLIENT = SpanKind.CLIENT
_CLIENT_VALUE = SpanKind.CLIENT.value


class RemoteParent:
    """The caller's span that a served call's ``traceparent`` names.

    It has the fields of a remote ``SpanContext`` that an ``RpcSpan`` reads,
    in slots, because a SpanContext costs more to make and to read, and
    every traced call from a worker carries one.
    """

    __slots__ = ("span_id", "trace_flags", "trace_id", "trace_state")
    is_remote = True
    is_valid = True

    def __init__(
        self,
        trace_id: int,
        span_id: int,
        trace_flags: int,
        trace_state: TraceState | None,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.trace_flags = trace_flags
        self.trace_state = trace_state

    def span_context(self) -> SpanContext:
        """Return the same span context as a ``SpanContext``."""
        flags = TraceFlags(self.trace_flags)
        return SpanContext(self.trace_id, self.span_id, True, flags, self.trace_state)


# The maximum lengths of the traceparent and tracestate headers that the W3C
# propagator of OpenTelemetry reads. It ignores longer ones.
_TRACEPARENT_MAX_LENGTH = 512
_TRACESTATE_MAX_LENGTH = 8192
# A W3C traceparent header: version, trace id, parent span id, flags, and
# whatever a later version adds, with optional blanks around it.
_TRACEPARENT = re.compile(
    r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*"
)
# The length of a traceparent of version 00, and the last digits of its
# flags that have the sampled bit set.
_TRACEPARENT_LENGTH = 55
_SAMPLED_LAST_DIGITS = frozenset("13579bdf")


def remote_parent(traceparent: object, tracestate: object) -> RemoteParent | None:
    """Return the caller's span that a call's ``traceparent`` names, if valid.

    ``tracestate`` is the call's tracestate entry, or None. Accepts and
    rejects what the W3C trace-context propagator does, in fewer steps.
    """
    if type(traceparent) is not str or len(traceparent) > _TRACEPARENT_MAX_LENGTH:
        return None
    match = _TRACEPARENT.fullmatch(traceparent)
    if match is None:
        return None
    version, trace_hex, span_hex, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id = int(trace_hex, 16)
    span_id = int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return RemoteParent(trace_id, span_id, int(flags, 16), read_tracestate(tracestate))


def read_tracestate(tracestate: object) -> TraceState | None:
    """Return a call's tracestate entry (or None) as the W3C propagator reads it.

    An invalid one gives an empty TraceState, and a warning logged.
    """
    if type(tracestate) is str and len(tracestate) <= _TRACESTATE_MAX_LENGTH:
        return TraceState.from_header([tracestate])
    return None


# A plain span as the coordinator hands it to the export process, made by
# ``RpcSpan.record``. Its fields are: trace id, span id, parent span id (0
# for none), whether the parent is remote, name, kind (SpanKind's value),
# start and end in ns since the epoch, attributes, status code
# (StatusCode's value) and status message. A span whose caller's
# traceparent is still unread has instead, in the first four: that header,
# the span id, the caller's tracestate (or None) and the trace id to use if
# the header is invalid. A record is a tuple of plain values, because
# marshal writes those quickly and the garbage collector stops tracking them.
SpanRecord = tuple[Any, int, Any, Any, str, int, int, int, dict[str, Any], int, str]


class RpcSpanFactory:
    """Starts ``RpcSpan``s of one tracer provider and ends them into its processor.

    ``sampler_name`` is the OTEL_TRACES_SAMPLER name of ``sampler``. For the
    default, parentbased_always_on, the decision is made inline instead of
    through the sampler's calls: sampled unless the parent is not.
    """

    # Slots: every RPC reads several of these.
    __slots__ = (
        "epoch",
        "epoch_attribute",
        "id_generator",
        "limits",
        "max_attributes",
        "max_length",
        "parent_or_always_on",
        "processor",
        "random_ids",
        "sampler",
    )

    def __init__(
        self,
        sampler: sampling.Sampler,
        sampler_name: str,
        id_generator: IdGenerator,
        processor: SpanProcessor,
        epoch_attribute: str,
        epoch: Callable[[], int],
    ) -> None:
        self.sampler = sampler
        self.parent_or_always_on = sampler_name == "parentbased_always_on"
        self.id_generator = id_generator
        # The default generator's ids, drawn without its method calls.
        self.random_ids = type(id_generator) is RandomIdGenerator
        self.processor = processor
        # Every span gets the leader epoch current when it starts.
        self.epoch_attribute = epoch_attribute
        self.epoch = epoch
        self.limits = SpanLimits()
        self.max_attributes = _max(self.limits.max_span_attributes)
        self.max_length = self.limits.max_span_attribute_length

    def start_served(
        self,
        name: str,
        traceparent: str | None,
        tracestate: str | None,
        attributes: dict[str, types.AttributeValue],
    ) -> trace.Span:
        """Start the SERVER span of a call that carried ``traceparent``, or none.

        ``tracestate`` is the call's tracestate entry, or None. As ``start``
        for the rest. A version-00 traceparent whose flags are odd leaves the
        span sampled under the default sampler whether it is valid (a sampled
        parent) or not (no parent). Such a span keeps the header as it came.
        The header is read when the span's context is first requested, or
        else in the export process. Every traced call from a worker carries
        one.
        """
        if traceparent is None:
            return self.start(name, _SERVER, None, attributes)
        if (
            self.parent_or_always_on
            and len(traceparent) == _TRACEPARENT_LENGTH
            and traceparent[-1] in _SAMPLED_LAST_DIGITS
        ):
            return self.start(name, _SERVER, traceparent, attributes, tracestate)
        parent = remote_parent(traceparent, tracestate)
        return self.start(name, _SERVER, parent, attributes)

    def start(
        self,
        name: str,
        kind: SpanKind,
        parent: SpanContext | RemoteParent | str | None,
        attributes: dict[str, types.AttributeValue],
        tracestate: str | None = None,
    ) -> trace.Span:
        """Start a span below ``parent``, a valid span context, or a root span.

        Takes ownership of ``attributes``, whose values must be valid
        attribute values, because this hot path does not check them. Returns a
        non-recording span that still carries the trace context when the
        sampler drops it. A ``str`` parent is a caller's traceparent that
        ``start_served`` leaves unread, with ``tracestate`` its tracestate;
        the span then draws the trace id it has if the header is invalid.
        """
        if parent is None or isinstance(parent, str):
            if self.random_ids:
                trace_id = getrandbits(128) or self.id_generator.generate_trace_id()
            else:
                trace_id = self.id_generator.generate_trace_id()
        else:
            trace_id = parent.trace_id
        trace_state: TraceState | str | None
        if isinstance(parent, str):
            # Sampled whether the header is valid or not (see start_served).
            sampled = True
            trace_state = tracestate
        elif self.parent_or_always_on:
            sampled = parent is None or bool(parent.trace_flags & TraceFlags.SAMPLED)
            trace_state = parent.trace_state if parent is not None else None
        else:
            context = Context()
            if isinstance(parent, RemoteParent):
                parent = parent.span_context()
            if parent is not None:
                context = trace.set_span_in_context(NonRecordingSpan(parent))
            result = self.sampler.should_sample(
                context, trace_id, name, kind, attributes, None
            )
            # RECORD_ONLY spans would never be exported, so they are not
            # recorded either.
            sampled = result.decision is sampling.Decision.RECORD_AND_SAMPLE
            trace_state = result.trace_state
            if result.attributes:
                attributes.update(result.attributes)
        if self.random_ids:
            span_id = getrandbits(64) or self.id_generator.generate_span_id()
        else:
            span_id = self.id_generator.generate_span_id()
        if not sampled:
            # Only a span with its caller's header read gets here.
            assert not isinstance(trace_state, str)
            return NonRecordingSpan(
                SpanContext(trace_id, span_id, False, _NOT_SAMPLED, trace_state)
            )
        attributes[self.epoch_attribute] = self.epoch()
        span = RpcSpan(
            self, name, kind, trace_id, span_id, parent, trace_state, attributes
        )
        if self.max_length is not None or len(attributes) > self.max_attributes:
            self._apply_limits(span)
        return span

    def _apply_limits(self, span: RpcSpan) -> None:
        """Cut the start attributes of ``span`` to the span limits, as
        ``set_attribute`` would have."""
        unchecked = span.attributes
        span.attributes = {}
        for key, value in unchecked.items():
            span.set_attribute(key, value)


class RpcSpan(trace.Span):
    """A sampled span with its attributes in a plain dict, exported over OTLP.

    Attribute values of type str, bool, int and float are stored as given,
    with strings cut to the attribute length limit. Sequences and invalid
    values go through the SDK's ``BoundedAttributes`` checks. Not thread-safe: the
    coordinator changes a span only from its event loop.

    A span started with its caller's traceparent still unread (a ``str``
    ``parent``, see ``RpcSpanFactory.start_served``) reads it on the first
    access to ``trace_id``, ``parent`` or ``trace_state``. Until then its
    ``record`` carries the header, for the export process to read.
    """

    __slots__ = (
        "_parent",
        "_trace_id",
        "_trace_state",
        "attributes",
        "end_time",
        "factory",
        "kind",
        "name",
        "span_id",
        "start_time",
    )

    # Most spans keep these defaults, so they are class attributes until a
    # span sets its own (in the instance dict that trace.Span provides).
    dropped_attributes = 0
    events: tuple[tuple[str, int, Mapping[str, types.AttributeValue]], ...] = ()
    dropped_events = 0
    links: tuple[Link, ...] = ()
    dropped_links = 0
    status = _UNSET
    _span_context: SpanContext | None = None
    # False once the span has anything beyond its ids, times, attributes
    # and status: events, links, a trace state or dropped counts.
    plain = True

    def __init__(
        self,
        factory: RpcSpanFactory,
        name: str,
        kind: SpanKind,
        trace_id: int,
        span_id: int,
        parent: SpanContext | RemoteParent | str | None,
        trace_state: TraceState | str | None,
        attributes: dict[str, types.AttributeValue],
    ) -> None:
        """``parent`` may be a caller's traceparent header, not yet read.

        ``trace_state`` is then the caller's tracestate header or None, and
        ``trace_id`` the span's trace id in case the header is invalid.
        """
        self.factory = factory
        self.name = name
        self.kind = kind
        self._trace_id = trace_id
        self.span_id = span_id
        self._parent = parent
        self._trace_state = trace_state
        if trace_state and type(parent) is not str:
            self.plain = False
        self.attributes = attributes
        self.end_time: int | None = None
        self.start_time = time_ns()

    @property
    def trace_id(self) -> int:
        if type(self._parent) is str:
            self._read_caller()
        return self._trace_id

    @property
    def parent(self) -> SpanContext | RemoteParent | None:
        parent = self._parent
        if type(parent) is str:
            self._read_caller()
            parent = self._parent
        return parent  # type: ignore[return-value]

    @property
    def trace_state(self) -> TraceState | None:
        if type(self._parent) is str:
            self._read_caller()
        return self._trace_state  # type: ignore[return-value]

    def record(self) -> SpanRecord:
        """Return this ended span's values as ``SpanRecord`` lays them out.

        For a plain span only (see ``plain``).
        """
        parent = self._parent
        trace_field: Any
        parent_field: Any
        remote_field: Any
        if isinstance(parent, str):
            trace_field, parent_field, remote_field = (
                parent,
                self._trace_state,
                self._trace_id,
            )
        elif parent is None:
            trace_field, parent_field, remote_field = self._trace_id, 0, False
        else:
            trace_field = self._trace_id
            parent_field = parent.span_id
            remote_field = parent.is_remote
        # Enum values are read through a property, costly on this path.
        kind = self.kind
        if kind is _SERVER:
            kind_value = _SERVER_VALUE
        elif kind is _CLIENT:
            kind_value = _CLIENT_VALUE
        else:
            kind_value = kind.value
        status = self.status
        if status is _UNSET:
            code, message = _UNSET_VALUE, ""
        else:
            code, message = status.status_code.value, status.description or ""
        return (
            trace_field,
            self.span_id,
            parent_field,
            remote_field,
            self.name,
            kind_value,
            self.start_time,
            self.end_time or 0,
            self.attributes,
            code,
            message,
        )

    def _read_caller(self) -> None:
        header, tracestate = self._parent, self._trace_state
        parent = remote_parent(header, None)
        if parent is None:
            # An invalid header: the span is the root of a trace of its own.
            self._parent = None
            self._trace_state = None
            return
        # The ids are settled before the tracestate is read, since reading
        # it may log a warning, and a log line reads this span's context.
        self._trace_id = parent.trace_id
        self._parent = parent
        self._trace_state = None
        trace_state = read_tracestate(tracestate)
        if trace_state:
            parent.trace_state = trace_state
            self._trace_state = trace_state
            self.plain = False
            # A log line may have made the context without the trace state.
            self._span_context = None

    # Span processors read ``span.context``, as of the SDK's ReadableSpan.
    @property
    def context(self) -> SpanContext:
        return self.get_span_context()

    def get_span_context(self) -> SpanContext:
        if self._span_context is None:
            self._span_context = SpanContext(
                self.trace_id, self.span_id, False, _SAMPLED, self.trace_state
            )
        return self._span_context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if self.end_time is not None:
            logger.warning("attribute %s not set: span %s has ended", key, self.name)
            return
        factory = self.factory
        kind = type(value)
        if kind is str and type(key) is str and key:
            if factory.max_length is not None:
                value = value[: factory.max_length]  # type: ignore[index]
        elif kind not in _SCALARS or type(key) is not str or not key:
            cleaned = _clean(key, value, factory.max_length)
            if cleaned is None:
                return
            value = cleaned
        attributes = self.attributes
        if key not in attributes and len(attributes) >= factory.max_attributes:
            self.dropped_attributes += 1
            self.plain = False
            return
        attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self,
        name: str,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
    ) -> None:
        if self.end_time is not None:
            logger.warning("event %s not added: span %s has ended", name, self.name)
            return
        limits = self.factory.limits
        if len(self.events) >= _max(limits.max_events):
            self.dropped_events += 1
            self.plain = False
            return
        cleaned = _bounded(
            limits.max_event_attributes, attributes, limits.max_attribute_length
        )
        moment = time_ns() if timestamp is None else timestamp
        self.events = (*self.events, (name, moment, cleaned))
        self.plain = False

    def add_link(
        self, context: SpanContext, attributes: types.Attributes = None
    ) -> None:
        if self.end_time is not None:
            logger.warning("link not added: span %s has ended", self.name)
            return
        if not context.is_valid and not attributes:
            return
        limits = self.factory.limits
        if len(self.links) >= _max(limits.max_links):
            self.dropped_links += 1
            self.plain = False
            return
        cleaned = _bounded(
            limits.max_link_attributes, attributes, limits.max_attribute_length
        )
        self.links = (*self.links, Link(context, cleaned))
        self.plain = False

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def set_status(
        self, status: Status | StatusCode, description: str | None = None
    ) -> None:
        # As in the SDK: UNSET changes nothing, an OK status is final, and a
        # description goes only with ERROR (Status drops it otherwise).
        code = status.status_code if isinstance(status, Status) else status
        if self.end_time is not None or code is StatusCode.UNSET:
            return
        if self.status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            self.status = status
        else:
            self.status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        described: dict[str, types.AttributeValue] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(
                traceback.format_exception(
                    type(exception), exception, exception.__traceback__
                )
            ),
            "exception.escaped": str(escaped),
        }
        if attributes:
            described.update(attributes)
        self.add_event("exception", described, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is not None:
            logger.warning("span %s ended twice; the second end is ignored", self.name)
            return
        self.end_time = time_ns() if end_time is None else end_time
        self.factory.processor.on_end(self)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"RpcSpan(name={self.name!r}, trace_id=0x{self.trace_id:032x}, "
            f"span_id=0x{self.span_id:016x})"
        )


def _max(limit: int | None) -> float:
    return float("inf") if limit is None else limit


def _bounded(
    max_count: int | None, attributes: types.Attributes, max_length: int | None
) -> BoundedAttributes:
    """Return ``attributes`` checked and limited as the SDK's spans store them."""
    return BoundedAttributes(
        max_count, attributes, immutable=True, max_value_len=max_length
    )


def _clean(key: Any, value: Any, max_length: int | None) -> types.AttributeValue | None:
    """Return ``value`` as the SDK would store it, or None (logged) if invalid.

    A value of a subclass of a valid type, such as an IntEnum, becomes a
    value of the type itself, as the OTLP encoding writes it: the export
    process receives the spans through marshal, which takes only the
    built-in types.
    """
    cleaned = _bounded(1, {key: value}, max_length).get(key)
    if isinstance(cleaned, tuple):
        return tuple(_plain(item) for item in cleaned)
    return None if cleaned is None else _plain(cleaned)


def _plain(value: Any) -> Any:
    """Return a scalar attribute value as its exact built-in type, keeping
    its value (a str Enum's value, not its name)."""
    if type(value) in _SCALARS or type(value) is bytes:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, bytes):
        return bytes.__bytes__(value)
    return value
