"""The spans and metrics of checkpoints, submissions, deployments and recovery.

Every checkpoint is one trace. Its root span, ``checkpoint.trigger``, is
made when the coordinator decides the trigger, and its context is stored in
the checkpoint-triggered event. Everything later hangs below that context:
the TriggerTaskCheckpoint calls, each task's ``checkpoint.align`` and
``checkpoint.snapshot`` spans, the AcknowledgeCheckpoint calls, and the
``checkpoint.completed`` or ``checkpoint.failed`` span, which runs from the
trigger to the end. A coordinator that replayed the event after a restart
or a failover takes the context from its state, so what it emits for the
checkpoint joins the same trace.

NOTE: a span waits in the process for up to observability.relay.HAND_OVER_S
(0.1 s) before its export process has it. A coordinator killed with SIGKILL
in that time loses it, so the trace of a checkpoint triggered just before
can lack its ``checkpoint.trigger`` root even though its later spans join it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.trace import (
    Link,
    Span,
    SpanKind,
    Status,
    StatusCode,
)
from opentelemetry.util.types import AttributeValue

from observability import instruments
from observability.propagation import (
    extract,
    from_barrier_options,
    has_span,
    inject,
)
from observability.rpcspans import RpcSpan
from observability.setup import (
    rpc_spans_for,
    tracer,
    tracing_enabled,
)
from protos import jobledger_events_pb2 as pb

logger = logging.getLogger(__name__)


JOB = "jobledger.job.id"
CHECKPOINT = "jobledger.checkpoint.id"
TASK = "jobledger.task.id"
ATTEMPT = "jobledger.task.attempt"
TASK_MANAGER = "jobledger.task_manager.id"
ACKNOWLEDGEMENT = "jobledger.acknowledgement"
# The gRPC status code of an RPC span, as its number (0 is OK).
STATUS_CODE = "rpc.grpc.status_code"
OK_CODE = grpc.StatusCode.OK.value[0]

_NS_PER_MS = 1_000_000

T = TypeVar("T")


def trigger_span(
    job_id: str, checkpoint_id: int, tasks: int, manual: bool
) -> dict[str, str]:
    """Record the root span of a checkpoint's trace; return its carrier.

    The span starts a new trace, linked to the current span (the
    RequestCheckpoint call of a manual checkpoint). Returns an empty
    carrier when tracing is off.
    """
    if not tracing_enabled():
        return {}
    current = trace.get_current_span().get_span_context()
    links = [Link(current)] if current.is_valid else []
    span = tracer().start_span(
        "checkpoint.trigger",
        context=Context(),
        links=links,
        attributes={
            JOB: job_id,
            CHECKPOINT: checkpoint_id,
            "jobledger.checkpoint.tasks_to_acknowledge": tasks,
            "jobledger.checkpoint.manual": manual,
        },
    )
    span.end()
    return inject(trace.set_span_in_context(span))


def record_events(state: pb.CoordinatorState, events: list[pb.Event]) -> None:
    """Record spans and metrics of durable events; ``state`` is after them."""
    for ev in events:
        name = ev.WhichOneof("body")
        if name == "checkpoint_completed":
            _completed(state, ev)
        elif name == "checkpoint_failed":
            _failed(state, ev)
        elif name == "job_failing_over":
            instruments.failovers.add(1, {JOB: ev.job_failing_over.job_id})
        elif name == "job_restarted":
            _restarted(state, ev)


def _completed(state: pb.CoordinatorState, ev: pb.Event) -> None:
    body = ev.checkpoint_completed
    checkpoint = state.checkpoints.get(body.checkpoint_id)
    if checkpoint is None:
        return
    end_ms = ev.timestamp.ToMilliseconds()
    size = sum(a.snapshot_size for a in checkpoint.acknowledgements.values())
    attributes = {JOB: body.job_id}
    instruments.checkpoints_completed.add(1, attributes)
    instruments.checkpoint_duration.record(
        max(0, end_ms - checkpoint.triggered_ms) / 1000, attributes
    )
    instruments.checkpoint_size.record(size, attributes)
    span = _end_span("checkpoint.completed", checkpoint, ev)
    if span is not None:
        span.set_attribute("jobledger.checkpoint.size", size)
        span.set_attribute(
            "jobledger.checkpoint.acknowledged_tasks", len(checkpoint.acknowledgements)
        )
        span.end(end_time=end_ms * _NS_PER_MS)


def _failed(state: pb.CoordinatorState, ev: pb.Event) -> None:
    body = ev.checkpoint_failed
    reason = pb.CheckpointFailureReason.Name(body.failure)
    if body.failure == pb.CHECKPOINT_EXPIRED:
        instruments.checkpoints_expired.add(1, {JOB: body.job_id})
    else:
        instruments.checkpoints_failed.add(1, {JOB: body.job_id, "reason": reason})
    checkpoint = state.checkpoints.get(body.checkpoint_id)
    if checkpoint is None:
        return
    span = _end_span("checkpoint.failed", checkpoint, ev)
    if span is not None:
        span.set_attribute("jobledger.checkpoint.failure", reason)
        span.set_attribute("jobledger.checkpoint.failure_message", body.message)
        span.set_status(Status(StatusCode.ERROR, f"{reason}: {body.message}"))
        span.end(end_time=ev.timestamp.ToMilliseconds() * _NS_PER_MS)


def _end_span(name: str, checkpoint: pb.CheckpointState, ev: pb.Event) -> Span | None:
    """Start the span of a checkpoint's end, from its trigger, in its trace."""
    if not tracing_enabled() or not has_span(checkpoint.trace_context):
        return None
    return tracer().start_span(
        name,
        context=extract(checkpoint.trace_context),
        start_time=checkpoint.triggered_ms * _NS_PER_MS,
        attributes={
            JOB: checkpoint.job_id,
            CHECKPOINT: checkpoint.checkpoint_id,
            "jobledger.event.seq": ev.seq,
        },
    )


def failover_span(
    job_id: str, reason: str, delay_ms: int, checkpoint_id: int
) -> dict[str, str]:
    """Record the root span of a recovery's trace; return its carrier.

    The carrier is stored in the failover event, so that the restart and
    the redeployment join the trace. Empty when tracing is off.
    """
    if not tracing_enabled():
        return {}
    current = trace.get_current_span().get_span_context()
    span = tracer().start_span(
        "job.failover",
        context=Context(),
        links=[Link(current)] if current.is_valid else [],
        attributes={
            JOB: job_id,
            "jobledger.failover.reason": reason,
            "jobledger.restart.delay_ms": delay_ms,
            "jobledger.restore.checkpoint_id": checkpoint_id,
        },
    )
    span.set_status(Status(StatusCode.ERROR, reason))
    span.end()
    return inject(trace.set_span_in_context(span))


def recovery_context(state: pb.CoordinatorState, job_id: str) -> Context | None:
    """Return the context of the job's latest failover trace, if any."""
    job = state.jobs.get(job_id)
    if job is None or not has_span(job.recovery_trace_context):
        return None
    return extract(job.recovery_trace_context)


def _restarted(state: pb.CoordinatorState, ev: pb.Event) -> None:
    body = ev.job_restarted
    parent = recovery_context(state, body.job_id)
    if not tracing_enabled() or body.requested or parent is None:
        return
    at_ns = ev.timestamp.ToMilliseconds() * _NS_PER_MS
    span = tracer().start_span(
        "job.restart",
        context=parent,
        start_time=at_ns,
        attributes={
            JOB: body.job_id,
            "jobledger.restore.checkpoint_id": body.restore_checkpoint_id,
            "jobledger.event.seq": ev.seq,
        },
    )
    span.end(end_time=at_ns)


def carrier_for_worker(carrier: Mapping[str, str]) -> dict[str, str]:
    """Return the context a worker passes on with a checkpoint's barriers.

    That is the checkpoint's own context when the trigger carried one, and
    the current span (the instrumented TriggerTaskCheckpoint call) otherwise.
    """
    if has_span(carrier):
        return dict(carrier)
    return inject()


def annotate_rpc(attributes: dict[str, str | int]) -> None:
    """Add ``attributes`` to the span of the RPC being served.

    Keys are full attribute names, such as the constants of this module.
    Values are of type str or int exactly, not of a subclass such as an
    enum's: the common case stores them without checks. Does nothing
    outside a ``traced_rpc`` handler or when its span is not recorded.
    """
    span = _get_current().get(_RPC_SPAN_KEY)
    if type(span) is not RpcSpan:
        return
    stored = span.attributes
    factory = span.factory
    if (
        factory.max_length is None
        and len(stored) + len(attributes) <= factory.max_attributes
        and span.end_time is None
    ):
        stored.update(attributes)
        return
    for key, value in attributes.items():
        span.set_attribute(key, value)


def start_task_checkpoint(
    job_id: str,
    task_id: str,
    attempt: int,
    checkpoint_id: int,
    trace_options: bytes,
    alignment_started_ns: int = 0,
) -> Span | None:
    """Start a task's ``checkpoint.snapshot`` span in the barrier's trace.

    A task that aligned barriers of several inputs (``alignment_started_ns``
    is when the first arrived) also records a ``checkpoint.align`` span up
    to now. Returns None when tracing is off; end the span with
    ``end_task_checkpoint``.
    """
    if not tracing_enabled():
        return None
    parent = extract(from_barrier_options(trace_options))
    attributes: dict[str, AttributeValue] = {
        JOB: job_id,
        TASK: task_id,
        ATTEMPT: attempt,
        CHECKPOINT: checkpoint_id,
    }
    if alignment_started_ns:
        align = tracer().start_span(
            "checkpoint.align",
            context=parent,
            start_time=alignment_started_ns,
            attributes=attributes,
        )
        align.end()
    return tracer().start_span(
        "checkpoint.snapshot", context=parent, attributes=attributes
    )


def end_task_checkpoint(
    span: Span | None, size: int = 0, duration_ms: int = 0, failure: str = ""
) -> None:
    """End a ``checkpoint.snapshot`` span with its size and duration or failure."""
    if span is None:
        return
    if failure:
        span.set_status(Status(StatusCode.ERROR, failure))
    else:
        span.set_attribute("jobledger.snapshot.size", size)
        span.set_attribute("jobledger.snapshot.duration_ms", duration_ms)
    span.end()


def use(span: Span | None) -> contextlib.AbstractContextManager[object]:
    """Make ``span`` current in a ``with`` block; do nothing for None."""
    if span is None:
        return contextlib.nullcontext()
    return trace.use_span(span, end_on_exit=False)


Servicer = TypeVar("Servicer")
Request = TypeVar("Request")


class RpcRoute:
    """The span name and attributes of one traced RPC method, made once."""

    __slots__ = ("attributes", "method", "name", "service")

    def __init__(self, service: str, method: str) -> None:
        """``service`` is the full gRPC service name, ``method`` the method's."""
        self.service = service
        self.method = method
        self.name = f"/{service}/{method}"
        # Each span starts with a copy.
        self.attributes: dict[str, AttributeValue] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            STATUS_CODE: OK_CODE,
        }


Answer = Callable[[Servicer, Request, grpc.aio.ServicerContext], Awaitable[T]]


def traced_rpc(
    route: RpcRoute, answer: Answer[Servicer, Request, T]
) -> Answer[Servicer, Request, T]:
    """Return a gRPC method handler that awaits ``answer`` in a SERVER span.

    While ``rpc_spans_for(route.service)`` gives no factory (tracing off,
    or the service excluded) the handler only awaits ``answer``. The span
    is a child of the caller's span when the call carries a W3C
    ``traceparent`` metadata entry, as the gRPC instrumentation of a client
    sends it, and the root of a trace otherwise. An RPC that aborts gets
    the status code it aborted with.
    """

    # Written without context managers, helpers or an extra coroutine,
    # since it runs on every RPC.
    async def handle(
        servicer: Servicer, request: Request, context: grpc.aio.ServicerContext
    ) -> T:
        factory = rpc_spans_for(route.service)
        if factory is None:
            return await answer(servicer, request, context)
        # The last entry of each counts, as in a carrier dict of the metadata.
        traceparent = tracestate = None
        for key, value in context.invocation_metadata() or ():
            if key == "traceparent":
                traceparent = value
            elif key == "tracestate":
                tracestate = value
        span = factory.start_served(
            route.name, traceparent, tracestate, route.attributes.copy()
        )
        # The span stays current after the call, not reset: gRPC serves each
        # call in an asyncio task of its own, which ends with it, and each
        # reset costs the hot path. The task starts with an empty context, so
        # the new one is what set_span_in_context would make of it. It also
        # keeps the span under a key of its own, for annotate_rpc to find it
        # below spans started in the call.
        _attach(Context({_SPAN_KEY: span, _RPC_SPAN_KEY: span}))
        try:
            return await answer(servicer, request, context)
        except BaseException as exc:
            _served_failed(span, context, exc)
            raise
        finally:
            span.end()

    return handle


def _served_failed(
    span: Span, context: grpc.aio.ServicerContext, exc: BaseException
) -> None:
    """Set the status code and error status on the span of a call that raised."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        name = code.name
        span.set_attribute(STATUS_CODE, code.value[0])
    else:
        # Not an abort: the call was cancelled, or gRPC replies UNKNOWN.
        name = type(exc).__name__
        cancelled = isinstance(exc, asyncio.CancelledError)
        status = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN
        span.set_attribute(STATUS_CODE, status.value[0])
    span.set_status(Status(StatusCode.ERROR, f"{name}: {context.details()}"))


# The key of the current span in an OpenTelemetry context, read once from
# what set_span_in_context makes, so that traced_rpc can build its context
# in one step.
(_SPAN_KEY,) = trace.set_span_in_context(trace.INVALID_SPAN, Context())
# The key of the span of the RPC being served.
_RPC_SPAN_KEY = otel_context.create_key("jobledger-rpc-span")
# The OpenTelemetry context of the running code is a context variable, with
# the default runtime context. Setting and reading it directly saves the
# calls of attach and get_current on every RPC.
_attach: Callable[[Context], object] = otel_context.attach
_get_current: Callable[[], Context] = otel_context.get_current
_runtime = otel_context._RUNTIME_CONTEXT
if type(_runtime) is ContextVarsRuntimeContext:
    _attach = _runtime._current_context.set
    _get_current = _runtime._current_context.get


Metadata = tuple[tuple[str, str], ...]


async def call_traced(
    service: str,
    method: str,
    call: Callable[[Metadata], Awaitable[T]],
    metadata: Metadata,
) -> T:
    """Await ``call(metadata)`` inside a CLIENT span of the RPC.

    The span is a child of the current span, and the W3C ``traceparent``
    of the span goes to the server in the call's metadata, as the gRPC
    instrumentation's client interceptor would send it. With tracing off
    the call is made as it is.
    """
    factory = rpc_spans_for(service)
    if factory is None:
        return await call(metadata)
    parent = trace.get_current_span().get_span_context()
    span = factory.start(
        f"/{service}/{method}",
        SpanKind.CLIENT,
        parent if parent.is_valid else None,
        {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            STATUS_CODE: OK_CODE,
        },
    )
    carrier = inject(trace.set_span_in_context(span))
    try:
        return await call(metadata + tuple(carrier.items()))
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        span.set_attribute(STATUS_CODE, code.value[0])
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {exc.details()}"))
        raise
    except BaseException as exc:
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        span.end()
