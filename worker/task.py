"""One subtask attempt: its operator chain, inputs, outputs and checkpoints.

A task is built from a TaskDeploymentDescriptor (``build_task``, which
raises DescriptorError for a descriptor it cannot run) and then runs in
its own asyncio task. A source task reads its source and injects a barrier
after the current record when a checkpoint is triggered. Any other task
reads its input gate, which aligns the barriers. At a barrier the task
snapshots every operator of its chain, forwards the barrier, writes the
snapshot to the state backend and acknowledges it to the coordinator.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any, Protocol

from opentelemetry.trace import Span

from observability import spans
from protos import jobledger_events_pb2 as pb
from protos import jobmanager_internal_pb2 as fpb
from worker.exchange import (
    ChannelKey,
    ChannelRegistry,
    InputChannel,
    LocalSender,
    RemoteSender,
    Sender,
)
from worker.gate import InputGate
from worker.operators import (
    SOURCES,
    ConfigError,
    FileSource,
    Operator,
    OperatorContext,
    create_operator,
    create_source,
)
from worker.operators.base import Output, key_selector
from worker.operators.sinks import FileSink
from worker.records import MAX_WATERMARK, Barrier, Record, Watermark
from worker.snapshots import SnapshotError, SnapshotStore
from worker.writer import OutputEdge, RecordWriter

logger = logging.getLogger(__name__)

# Seconds a paced source may run ahead of its schedule before it sleeps.
PACE_SLEEP_S = 0.002
# Records a source task emits between two yields to the event loop, which
# runs the worker's RPCs, heartbeats and other tasks. In a profile of the
# flight-delays job one pass of the loop cost several times what one record
# did, so yielding after every record took most of the source's time.
SOURCE_YIELD_EVERY = 64


class DescriptorError(ValueError):
    """A deployment descriptor cannot be run; the message gives the reason."""


class TaskConfigError(DescriptorError):
    """The task's operator names or configuration are invalid.

    A new attempt gets the same configuration, so it would fail the same way;
    the coordinator fails the job instead of restarting it.
    """


@dataclasses.dataclass(frozen=True, slots=True)
class TaskKey:
    """One attempt of one subtask of one job."""

    job_id: str
    vertex_id: str
    subtask_index: int
    attempt: int

    @property
    def task_id(self) -> str:
        return f"{self.vertex_id}_{self.subtask_index}"

    def __str__(self) -> str:
        return f"{self.task_id} attempt {self.attempt} of job {self.job_id}"


class Reporter(Protocol):
    """The reports a task sends to the coordinator."""

    async def task_status(
        self, key: TaskKey, status: pb.TaskStatus.ValueType, reason: str
    ) -> None: ...

    async def acknowledge(self, request: fpb.AcknowledgeCheckpointRequest) -> None: ...

    async def decline(self, request: fpb.ReportFailedCheckpointRequest) -> None: ...


@dataclasses.dataclass(slots=True)
class TaskEnvironment:
    """The parts of the worker a task uses."""

    task_manager_id: str
    endpoint: str
    channels: ChannelRegistry
    snapshots: SnapshotStore
    reporter: Reporter


class _ChainOutput:
    """Feeds what one operator emits to the next operator of the chain."""

    def __init__(self, operator: Operator, output: Output) -> None:
        self.operator = operator
        self.output = output

    def emit(self, record: Record) -> None:
        self.operator.process(record, self.output)

    def emit_watermark(self, timestamp: int) -> None:
        self.operator.on_watermark(timestamp, self.output)


class Task:
    """A running subtask attempt. ``run`` returns when the attempt has ended."""

    def __init__(
        self,
        key: TaskKey,
        descriptor: fpb.TaskDeploymentDescriptor,
        environment: TaskEnvironment,
        source: FileSource | None,
        operators: list[Operator],
        channels: list[InputChannel],
        writer: RecordWriter,
    ) -> None:
        self.key = key
        self.descriptor = descriptor
        self.environment = environment
        self.source = source
        self.operators = operators
        self.channels = channels
        self.writer = writer
        # outputs[i] is where operators[i] emits: the next operator, or the
        # writer after the last one.
        self.outputs: list[Output] = []
        head: Output = writer
        for operator in reversed(operators):
            self.outputs.insert(0, head)
            head = _ChainOutput(operator, head)
        self.head = head
        self.records_in = 0
        self.finished = False
        self._barriers: list[Barrier] = []
        self._background: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None
        self._runner: asyncio.Task[None] | None = None
        self._source_watermark: int | None = None
        self._paced_since: float | None = None
        self._paced_records = 0

    # -------------------------------------------------------- lifecycle

    @property
    def done(self) -> bool:
        return self._runner is not None and self._runner.done()

    def start(self) -> None:
        """Start running in the background; see ``wait`` and ``cancel``."""
        self._runner = asyncio.create_task(self.run(), name=f"task {self.key}")

    async def wait(self) -> None:
        """Return once the attempt has ended, however it ended."""
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)

    async def cancel(self) -> None:
        """Stop the attempt without a report. Safe to call twice."""
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
        await self.wait()

    def fail(self, error: BaseException) -> None:
        """Fail the attempt from outside its loop, e.g. when a commit failed."""
        self._failure = error
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()

    async def run(self) -> None:
        """Run to the end, then report FINISHED, or FAILED on an error."""
        try:
            await self._open()
            self._report(pb.TASK_RUNNING, "")
            if self.source is not None:
                await self._run_source(self.source)
            else:
                await self._run_inputs()
            await self._finish()
        except asyncio.CancelledError:
            await self._abort_outputs()
            if self._failure is None:
                logger.info("task %s canceled", self.key)
                raise
            self._failed(self._failure)
        except Exception as exc:
            await self._abort_outputs()
            self._failed(exc)
        finally:
            self._close()
        await asyncio.gather(*self._background, return_exceptions=True)

    def _failed(self, exc: BaseException) -> None:
        logger.warning("task %s failed: %r", self.key, exc)
        self._report(pb.TASK_FAILED, f"{type(exc).__name__}: {exc}")

    async def _open(self) -> None:
        for operator in self.operators:
            operator.open()
        self._recover_sinks()
        if self.source is not None:
            self.source.open()
        for sender in self.writer.senders:
            await sender.start()

    def _recover_sinks(self) -> None:
        checkpoint_id = (
            self.descriptor.recovery_checkpoint_id if self.descriptor.is_recovery else 0
        )
        for operator in self.operators:
            if isinstance(operator, FileSink):
                operator.recover(checkpoint_id)

    async def _finish(self) -> None:
        for operator, output in zip(self.operators, self.outputs, strict=True):
            # Operators finish in chain order, so what one emits at the end
            # still passes through the ones after it.
            operator.finish(output)
        await self.writer.flush()
        for sender in self.writer.senders:
            await sender.close()
        self.finished = True
        logger.info("task %s finished", self.key)
        self._report(pb.TASK_FINISHED, "")

    async def _abort_outputs(self) -> None:
        for sender in self.writer.senders:
            await sender.abort()

    def _close(self) -> None:
        if self.source is not None:
            self.source.close()
        for operator in self.operators:
            operator.close()

    def _report(self, status: pb.TaskStatus.ValueType, reason: str) -> None:
        self._spawn(self.environment.reporter.task_status(self.key, status, reason))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -------------------------------------------------------- loops

    async def _run_source(self, source: FileSource) -> None:
        while True:
            while self._barriers:
                await self._checkpoint(self._barriers.pop(0))
            record = source.poll()
            if record is None:
                break
            self.records_in += 1
            self.head.emit(record)
            if self.writer.has_full_batch():
                self._emit_source_watermark(source)
                await self.writer.flush()
            if source.delay_s:
                await self._pace(source)
            elif self.records_in % SOURCE_YIELD_EVERY == 0:
                await asyncio.sleep(0)
        self._emit_source_watermark(source)
        self.head.emit_watermark(MAX_WATERMARK)
        for barrier in self._barriers:
            # A barrier after the last record would follow the end of input.
            reason = "the source reached the end of its input"
            self._spawn(self._decline(barrier.checkpoint_id, reason))
        self._barriers.clear()

    async def _pace(self, source: FileSource) -> None:
        """Hold the source to one record per ``delay_s`` on average.

        Sleeping after every record would cost a timer per record and cap
        the rate well below what small delays ask for, so the task sleeps
        only once it is ahead of the schedule by ``PACE_SLEEP_S``. It sends
        what is queued first, so that nothing waits out the pause.
        """
        now = time.monotonic()
        if self._paced_since is None:
            self._paced_since, self._paced_records = now, 0
        self._paced_records += 1
        ahead = self._paced_since + self._paced_records * source.delay_s - now
        if ahead < PACE_SLEEP_S:
            if self.records_in % SOURCE_YIELD_EVERY == 0:
                await asyncio.sleep(0)
            return
        self._emit_source_watermark(source)
        await self.writer.flush()
        await asyncio.sleep(ahead)

    def _emit_source_watermark(self, source: FileSource) -> None:
        watermark = source.watermark()
        if watermark is None:
            return
        if self._source_watermark is None or watermark > self._source_watermark:
            self._source_watermark = watermark
            self.head.emit_watermark(watermark)

    async def _run_inputs(self) -> None:
        gate = InputGate(self.channels)
        while True:
            if not gate.has_data():
                # Send what is queued before waiting, so nothing lingers.
                await self.writer.flush()
            element = await gate.next()
            if element is None:
                return
            if isinstance(element, Record):
                self.records_in += 1
                self.head.emit(element)
            elif isinstance(element, Watermark):
                self.head.emit_watermark(element.timestamp)
            elif isinstance(element, Barrier):
                await self._checkpoint(element, gate.alignment_started_ns)
            if self.writer.has_full_batch():
                await self.writer.flush()

    # -------------------------------------------------------- checkpoints

    def trigger_checkpoint(
        self, checkpoint_id: int, timestamp: int, trace_options: bytes = b""
    ) -> bool:
        """Inject a barrier after the current record; False if not a source."""
        if self.source is None or self.finished:
            return False
        self._barriers.append(Barrier(checkpoint_id, timestamp, trace_options))
        return True

    async def _checkpoint(
        self, barrier: Barrier, alignment_started_ns: int = 0
    ) -> None:
        """Snapshot the chain at ``barrier``, forward it, and acknowledge."""
        started = time.monotonic()
        span = spans.start_task_checkpoint(
            self.key.job_id,
            self.key.task_id,
            self.key.attempt,
            barrier.checkpoint_id,
            barrier.trace_options,
            alignment_started_ns,
        )
        await self.writer.flush()
        offsets = self.source.offsets() if self.source else {}
        data: bytes | None = None
        try:
            state = self._snapshot_state(barrier.checkpoint_id)
            data = SnapshotStore.encode(self.key.task_id, barrier.checkpoint_id, state)
        except SnapshotError as exc:
            # The checkpoint fails, the task goes on: the barrier is still
            # forwarded so that downstream tasks do not stay blocked.
            logger.warning("task %s: %s", self.key, exc)
            spans.end_task_checkpoint(span, failure=str(exc))
            self._spawn(self._decline(barrier.checkpoint_id, str(exc)))
        self.writer.broadcast(barrier)
        await self.writer.flush()
        if data is not None:
            self._spawn(
                self._persist(barrier.checkpoint_id, data, offsets, started, span)
            )

    def _snapshot_state(self, checkpoint_id: int) -> dict[str, Any]:
        """Collect the chain's state; raise SnapshotError naming the operator."""
        states = []
        for position, operator in enumerate(self.operators):
            try:
                states.append(operator.snapshot_state(checkpoint_id))
            except Exception as exc:
                raise SnapshotError(
                    f"snapshot of operator {position} ({type(operator).__name__}) "
                    f"of task {self.key.task_id} for checkpoint {checkpoint_id} "
                    f"failed: {exc!r}"
                ) from exc
        return {
            "job_id": self.key.job_id,
            "task_id": self.key.task_id,
            "attempt": self.key.attempt,
            "checkpoint_id": checkpoint_id,
            "operators": states,
            "source_offsets": self.source.offsets() if self.source else {},
        }

    async def _persist(
        self,
        checkpoint_id: int,
        data: bytes,
        offsets: dict[str, int],
        started: float,
        span: Span | None = None,
    ) -> None:
        store = self.environment.snapshots
        try:
            handle, size = await asyncio.to_thread(
                store.write, self.key.job_id, self.key.task_id, checkpoint_id, data
            )
        except SnapshotError as exc:
            logger.warning("task %s: %s", self.key, exc)
            spans.end_task_checkpoint(span, failure=str(exc))
            await self._decline(checkpoint_id, str(exc))
            return
        duration_ms = int((time.monotonic() - started) * 1000)
        request = fpb.AcknowledgeCheckpointRequest(
            job_id=self.key.job_id,
            checkpoint_id=checkpoint_id,
            task_manager_id=self.environment.task_manager_id,
            job_vertex_id=self.key.vertex_id,
            subtask_index=self.key.subtask_index,
            snapshot_handle=handle,
            source_offsets=offsets,
            snapshot_size=size,
            duration=duration_ms,
        )
        logger.debug("task %s acknowledges checkpoint %d", self.key, checkpoint_id)
        # The acknowledgement's RPC span is a child of the snapshot span.
        with spans.use(span):
            spans.end_task_checkpoint(span, size, duration_ms)
            await self.environment.reporter.acknowledge(request)

    async def _decline(self, checkpoint_id: int, reason: str) -> None:
        request = fpb.ReportFailedCheckpointRequest(
            job_id=self.key.job_id,
            checkpoint_id=checkpoint_id,
            job_vertex_id=self.key.vertex_id,
            subtask_index=self.key.subtask_index,
            failure_reason=reason,
            task_manager_id=self.environment.task_manager_id,
        )
        await self.environment.reporter.decline(request)

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        """Let the operators commit what they staged up to ``checkpoint_id``.

        A failing commit fails the attempt, because its output would be
        incomplete otherwise.
        """
        try:
            for operator in self.operators:
                operator.notify_checkpoint_complete(checkpoint_id)
        except Exception as exc:
            logger.exception(
                "task %s: commit of checkpoint %d failed", self.key, checkpoint_id
            )
            self.fail(exc)

    def notify_checkpoint_aborted(self, checkpoint_id: int) -> None:
        for operator in self.operators:
            operator.notify_checkpoint_aborted(checkpoint_id)


# ------------------------------------------------------------------ build


def _config(data: bytes, name: str) -> dict[str, Any]:
    try:
        config = json.loads(data or b"{}")
    except ValueError as exc:
        raise TaskConfigError(
            f"operator_configuration of {name!r} is not valid JSON: {exc}"
        ) from exc
    if not isinstance(config, dict):
        raise TaskConfigError(f"operator_configuration of {name!r} is not an object")
    return config


def _context(descriptor: fpb.TaskDeploymentDescriptor) -> OperatorContext:
    selectors = [
        info.serialized_key_selector
        for info in descriptor.input_keying_info
        if info.serialized_key_selector
    ]
    return OperatorContext(
        job_id=descriptor.job_graph_job_id,
        vertex_id=descriptor.job_vertex_id,
        subtask_index=descriptor.subtask_index,
        parallelism=max(1, descriptor.parallelism),
        attempt=descriptor.attempt,
        input_key_selector=selectors[0] if selectors else "",
    )


def _operators(
    descriptor: fpb.TaskDeploymentDescriptor, context: OperatorContext
) -> tuple[FileSource | None, list[Operator]]:
    head = descriptor.fully_qualified_operator_name
    chain = [(head, descriptor.operator_configuration)] + [
        (info.fully_qualified_operator_name, info.operator_configuration)
        for info in descriptor.chained_operator_info
    ]
    source = None
    operators: list[Operator] = []
    try:
        for position, (name, data) in enumerate(chain):
            config = _config(data, name)
            if position == 0 and name in SOURCES:
                source = create_source(name, config, context)
            else:
                operators.append(create_operator(name, config, context))
    except ConfigError as exc:
        raise TaskConfigError(str(exc)) from exc
    return source, operators


def _input_channels(
    descriptor: fpb.TaskDeploymentDescriptor, key: TaskKey, registry: ChannelRegistry
) -> list[InputChannel]:
    channels = []
    for upstream in descriptor.inputs:
        vertex = upstream.upstream_job_vertex_id or upstream.source_vertex_id
        if not vertex:
            raise DescriptorError("an input names no upstream vertex")
        channel_key = ChannelKey(
            key.job_id,
            key.vertex_id,
            key.subtask_index,
            vertex,
            upstream.upstream_subtask_index,
            key.attempt,
        )
        channels.append(registry.get(channel_key))
    return channels


def _senders(
    descriptor: fpb.TaskDeploymentDescriptor,
    key: TaskKey,
    environment: TaskEnvironment,
) -> dict[str, dict[int, Sender]]:
    """Return a sender per output, by target vertex and subtask index."""
    by_vertex: dict[str, dict[int, Sender]] = {}
    for output in descriptor.outputs:
        host, _, port = output.target_task_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise DescriptorError(
                f"output to {output.target_vertex_id}_"
                f"{output.target_specific_subtask_index} has target_task_endpoint "
                f"{output.target_task_endpoint!r}, which is not HOST:PORT"
            )
        channel_key = ChannelKey(
            key.job_id,
            output.target_vertex_id,
            output.target_specific_subtask_index,
            key.vertex_id,
            key.subtask_index,
            key.attempt,
        )
        sender: Sender
        if output.target_task_endpoint == environment.endpoint:
            sender = LocalSender(environment.channels.get(channel_key))
        else:
            sender = RemoteSender(channel_key, output.target_task_endpoint)
        senders = by_vertex.setdefault(output.target_vertex_id, {})
        senders[output.target_specific_subtask_index] = sender
    return by_vertex


def _hash_edge(
    vertex_id: str, senders: dict[int, Sender], info: fpb.OutputEdgeKeyingInfo | None
) -> OutputEdge:
    if info is None or not info.serialized_key_selector:
        raise TaskConfigError(f"HASH output to {vertex_id} has no key selector")
    try:
        key_of = key_selector(info.serialized_key_selector, "key selector")
    except ConfigError as exc:
        raise TaskConfigError(str(exc)) from exc
    parallelism = info.downstream_parallelism or len(senders)
    missing = set(range(parallelism)) - set(senders)
    if missing:
        raise DescriptorError(
            f"HASH output to {vertex_id} lacks subtasks {sorted(missing)}"
        )
    return OutputEdge(vertex_id, fpb.HASH, senders, key_of, parallelism)


def _output_edges(
    descriptor: fpb.TaskDeploymentDescriptor,
    key: TaskKey,
    environment: TaskEnvironment,
) -> list[OutputEdge]:
    keying = {info.target_job_vertex_id: info for info in descriptor.output_keying_info}
    edges = []
    for vertex_id, senders in _senders(descriptor, key, environment).items():
        mode = descriptor.output_shuffle_modes.get(vertex_id, fpb.FORWARD)
        if mode == fpb.HASH:
            edges.append(_hash_edge(vertex_id, senders, keying.get(vertex_id)))
        else:
            edges.append(OutputEdge(vertex_id, mode, senders, None, len(senders)))
    return edges


def _restore(
    descriptor: fpb.TaskDeploymentDescriptor,
    store: SnapshotStore,
    source: FileSource | None,
    operators: list[Operator],
) -> None:
    offsets: dict[str, int] = dict(descriptor.recovery_source_offsets)
    if descriptor.recovery_snapshot_handle:
        try:
            state = store.read(descriptor.recovery_snapshot_handle)
        except SnapshotError as exc:
            raise DescriptorError(str(exc)) from exc
        handle = descriptor.recovery_snapshot_handle
        states = state.get("operators") if isinstance(state, dict) else None
        if not isinstance(states, list) or len(states) != len(operators):
            raise DescriptorError(
                f"snapshot {handle} does not hold one state per operator of the "
                f"chain ({len(operators)}); was it written by another job?"
            )
        for position, (operator, operator_state) in enumerate(
            zip(operators, states, strict=True)
        ):
            _restore_operator(handle, position, operator, operator_state)
        offsets = offsets or state.get("source_offsets", {})
    if source is not None:
        source.restore_offsets(offsets)


def _restore_operator(
    handle: str, position: int, operator: Operator, state: Any
) -> None:
    """Restore one operator; raise DescriptorError when the state does not fit."""
    if state is None:
        return
    try:
        operator.restore_state(state)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise DescriptorError(
            f"snapshot {handle}: the state of operator {position} "
            f"({type(operator).__name__}) cannot be restored: {exc!r}"
        ) from exc


def build_task(
    descriptor: fpb.TaskDeploymentDescriptor, environment: TaskEnvironment
) -> Task:
    """Build a task; raise DescriptorError naming what is wrong.

    Building opens no connection and starts nothing, so a rejected
    descriptor leaves nothing behind but the input channels it named.
    """
    key = TaskKey(
        descriptor.job_graph_job_id,
        descriptor.job_vertex_id,
        descriptor.subtask_index,
        descriptor.attempt,
    )
    if not key.job_id or not key.vertex_id:
        raise DescriptorError("job_graph_job_id and job_vertex_id must be set")
    context = _context(descriptor)
    source, operators = _operators(descriptor, context)
    if source is None and not descriptor.inputs:
        raise TaskConfigError(
            f"task {key.task_id} runs {descriptor.fully_qualified_operator_name!r}, "
            "which is not a source, and has no inputs"
        )
    edges = _output_edges(descriptor, key, environment)
    if descriptor.is_recovery:
        _restore(descriptor, environment.snapshots, source, operators)
    channels = _input_channels(descriptor, key, environment.channels)
    writer = RecordWriter(edges)
    return Task(key, descriptor, environment, source, operators, channels, writer)
