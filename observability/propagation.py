"""Trace context carriers: W3C ``traceparent`` maps and barrier options.

A checkpoint's trace context travels as a ``{"traceparent": ...}`` map in
the checkpoint-triggered event and the TriggerCheckpointRequest, and as the
bytes ``jobledger:trace:`` followed by that map in JSON in a barrier's
``checkpoint_options``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import (
    TraceContextTextMapPropagator,
)

_PROPAGATOR = TraceContextTextMapPropagator()

BARRIER_OPTIONS_PREFIX = b"jobledger:trace:"


def inject(context: Context | None = None) -> dict[str, str]:
    """Return the carrier of ``context`` (the current one); empty without a span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return carrier


def extract(carrier: Mapping[str, str]) -> Context:
    """Return a context whose parent span is the one ``carrier`` names."""
    return _PROPAGATOR.extract(dict(carrier))


def has_span(carrier: Mapping[str, str]) -> bool:
    """Return whether ``carrier`` names a valid span."""
    span = trace.get_current_span(extract(carrier))
    return span.get_span_context().is_valid


def to_barrier_options(carrier: Mapping[str, str]) -> bytes:
    """Encode a carrier as a barrier's ``checkpoint_options``; b"" when empty."""
    if not carrier:
        return b""
    document = json.dumps(dict(carrier), separators=(",", ":"), sort_keys=True)
    return BARRIER_OPTIONS_PREFIX + document.encode()


def from_barrier_options(options: bytes) -> dict[str, str]:
    """Decode ``checkpoint_options``; empty for options of another kind."""
    if not options.startswith(BARRIER_OPTIONS_PREFIX):
        return {}
    try:
        document = json.loads(options[len(BARRIER_OPTIONS_PREFIX) :])
    except ValueError:
        return {}
    if not isinstance(document, dict):
        return {}
    return {str(k): str(v) for k, v in document.items()}
