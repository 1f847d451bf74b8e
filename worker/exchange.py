"""Data exchange between subtasks, with credit-based flow control.

Every pair of an upstream subtask and a downstream subtask is one channel.
The receiving side owns an InputChannel with a fixed number of buffers. One
buffer is one message: a batch of records, a watermark or a barrier. The
receiver grants one credit per free buffer and one more whenever the task
takes a buffer out, and a sender never sends without a credit, so a slow
consumer bounds what its senders hold in memory.

Between workers a channel is one ExchangeData stream. The sender names the
channel in the ``jobledger-channel`` metadata entry, the receiver replies
with credits. The end of input is a DataRecord without payload whose
``checkpoint_options`` are ``END_OF_INPUT_OPTION``, because a receiver
cannot tell a sender's half-close from its cancellation. A stream that ends
without that record fails the receiving task, so that a crashed upstream
worker is noticed without waiting for heartbeats. Channels
between subtasks of the same worker pass the elements in process, with the
same credits and without serialization.

A stream that names no channel is routed record by record by the
DataRecord's target and source fields. It gets as many credits as a channel
has buffers, and each comes back when the task takes the buffer it paid
for. A named stream that sends without a credit, or a payload that cannot
be decoded, ends the stream with RESOURCE_EXHAUSTED or INVALID_ARGUMENT and
fails the channel, so the receiving task fails instead of waiting.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from tenacity import AsyncRetrying, stop_after_delay, wait_exponential_jitter

from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc
from worker.records import (
    BATCH_METADATA_KEY,
    END_OF_INPUT,
    Barrier,
    Element,
    EndOfInput,
    Record,
    Watermark,
    decode_payload,
    encode_records,
)

logger = logging.getLogger(__name__)

CHANNEL_METADATA_KEY = "jobledger-channel"

END_OF_INPUT_OPTION = b"jobledger:end-of-input"

# Buffers per input channel, so credits a sender can hold.
DEFAULT_BUFFERS = 16

# Seconds a sender keeps trying to reach the receiving worker.
CONNECT_TIMEOUT_S = 15.0


class ChannelBroken(Exception):
    """An input channel ended without the end of input of its upstream."""


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelKey:
    """One channel of one attempt: upstream subtask to downstream subtask."""

    job_id: str
    target_vertex_id: str
    target_subtask_index: int
    source_vertex_id: str
    source_subtask_index: int
    attempt: int

    def encode(self) -> str:
        return json.dumps(dataclasses.astuple(self))

    @classmethod
    def decode(cls, text: str) -> ChannelKey:
        """Parse ``encode``'s output; raise ValueError for anything else."""
        try:
            job, vertex, index, source, source_index, attempt = json.loads(text)
            return cls(job, vertex, int(index), source, int(source_index), attempt)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid {CHANNEL_METADATA_KEY} {text!r}") from exc


class InputChannel:
    """The receiving end of one channel: a bounded queue of buffers."""

    def __init__(self, key: ChannelKey, buffers: int = DEFAULT_BUFFERS) -> None:
        self.key = key
        self.capacity = buffers
        self.buffers: collections.deque[list[Element]] = collections.deque()
        # Per queued buffer, the grant function of the stream that delivered
        # it, which gets the credit back when the buffer is taken. None means
        # the attached sender.
        self._returns: collections.deque[Callable[[int], None] | None] = (
            collections.deque()
        )
        self.failure: str | None = None
        # The upstream delivered its end of input.
        self.ended = False
        self.data_available = asyncio.Event()
        self._grant: Callable[[int], None] | None = None

    def attach(self, grant: Callable[[int], None]) -> None:
        """Connect a sender; it is granted a credit per free buffer right away."""
        self._grant = grant
        self.failure = None
        free = self.capacity - len(self.buffers)
        if free > 0:
            grant(free)

    def deliver(
        self, buffer: list[Element], credit_to: Callable[[int], None] | None = None
    ) -> None:
        """Queue one buffer a sender spent a credit on.

        The credit goes back to ``credit_to`` when the buffer is taken, or to
        the attached sender when it is None.
        """
        if isinstance(buffer[-1], EndOfInput):
            self.ended = True
        self.buffers.append(buffer)
        self._returns.append(credit_to)
        self.data_available.set()

    def take(self) -> list[Element] | None:
        """Take the oldest buffer, granting its credit back; None when empty."""
        if not self.buffers:
            return None
        buffer = self.buffers.popleft()
        credit_to = self._returns.popleft() or self._grant
        if credit_to is not None:
            credit_to(1)
        return buffer

    def fail(self, reason: str) -> None:
        """Mark the channel broken; the task reading it fails."""
        self.failure = reason
        self._grant = None
        self.data_available.set()


class ChannelRegistry:
    """The input channels of this worker, created by whichever end comes first.

    A sender may connect before the downstream task is deployed; the channel
    then waits, and its credits bound what the sender can send meanwhile.
    """

    def __init__(self, buffers: int = DEFAULT_BUFFERS) -> None:
        self.buffers = buffers
        self._channels: dict[ChannelKey, InputChannel] = {}

    def get(self, key: ChannelKey) -> InputChannel:
        channel = self._channels.get(key)
        if channel is None:
            channel = InputChannel(key, self.buffers)
            self._channels[key] = channel
        return channel

    def drop(
        self, job_id: str, vertex_id: str, subtask_index: int, attempts: range
    ) -> None:
        """Forget the channels into one subtask for the given attempts."""
        for key in list(self._channels):
            if (
                key.job_id == job_id
                and key.target_vertex_id == vertex_id
                and key.target_subtask_index == subtask_index
                and key.attempt in attempts
            ):
                del self._channels[key]

    def find_by_target(self, vertex_id: str, subtask_index: int) -> list[ChannelKey]:
        return [
            key
            for key in self._channels
            if (key.target_vertex_id, key.target_subtask_index)
            == (vertex_id, subtask_index)
        ]


class Sender:
    """The sending end of one channel."""

    async def start(self) -> None:
        """Connect; returns once the channel can take ``send`` calls."""

    async def send(self, buffer: list[Element]) -> None:
        """Send one buffer, waiting for a credit first."""
        raise NotImplementedError

    async def close(self) -> None:
        """Send the end of input and wait until the receiver has it."""

    async def abort(self) -> None:
        """Drop the channel without the end of input. Safe to call twice."""


class _Credits:
    """A credit count that senders wait on."""

    def __init__(self) -> None:
        self.count = 0
        # Why no credit can come any more, once the receiver is gone.
        self.failure: str | None = None
        self._changed = asyncio.Event()

    def grant(self, credits: int) -> None:
        self.count += credits
        self._changed.set()

    def fail(self, reason: str) -> None:
        """Wake the waiting sender; ``spend`` raises once the credits run out."""
        self.failure = reason
        self._changed.set()

    async def spend(self) -> None:
        """Take one credit, waiting for it; raise ConnectionError after ``fail``."""
        while self.count <= 0:
            if self.failure is not None:
                raise ConnectionError(self.failure)
            self._changed.clear()
            await self._changed.wait()
        self.count -= 1


class LocalSender(Sender):
    """A channel to a subtask of the same worker: elements pass in process."""

    def __init__(self, channel: InputChannel) -> None:
        self._channel = channel
        self._credits = _Credits()

    async def start(self) -> None:
        self._channel.attach(self._credits.grant)

    async def send(self, buffer: list[Element]) -> None:
        await self._credits.spend()
        self._channel.deliver(buffer)

    async def close(self) -> None:
        await self._credits.spend()
        self._channel.deliver([END_OF_INPUT])

    async def abort(self) -> None:
        self._channel.fail(
            f"upstream subtask {self._channel.key.source_vertex_id}_"
            f"{self._channel.key.source_subtask_index} stopped"
        )


def to_data_record(key: ChannelKey, buffer: list[Element]) -> fpb.DataRecord:
    """Encode one buffer as one DataRecord of the channel ``key``."""
    message = fpb.DataRecord(
        target_job_vertex_id=key.target_vertex_id,
        target_subtask_index=key.target_subtask_index,
        source_job_vertex_id=key.source_vertex_id,
        source_subtask_index=key.source_subtask_index,
    )
    first = buffer[0]
    if isinstance(first, EndOfInput):
        message.checkpoint_options = END_OF_INPUT_OPTION
    elif isinstance(first, Watermark):
        message.watermark_payload.timestamp = first.timestamp
    elif isinstance(first, Barrier):
        message.barrier_payload.checkpoint_id = first.checkpoint_id
        message.barrier_payload.checkpoint_timestamp = first.checkpoint_timestamp
        message.is_checkpoint_barrier = True
        message.checkpoint_options = first.trace_options
    else:
        records = [element for element in buffer if isinstance(element, Record)]
        message.data_payload = encode_records(records)
    return message


def from_data_record(message: fpb.DataRecord, batched: bool) -> list[Element]:
    """Decode one DataRecord into the elements of one buffer."""
    kind = message.WhichOneof("payload_type")
    if kind is None and message.checkpoint_options == END_OF_INPUT_OPTION:
        return [END_OF_INPUT]
    if kind == "watermark_payload":
        return [Watermark(message.watermark_payload.timestamp)]
    if kind == "barrier_payload" or message.is_checkpoint_barrier:
        barrier = message.barrier_payload
        options = message.checkpoint_options
        return [Barrier(barrier.checkpoint_id, barrier.checkpoint_timestamp, options)]
    elements: list[Element] = list(decode_payload(message.data_payload, batched))
    return elements


class RemoteSender(Sender):
    """A channel to a subtask on another worker, over one ExchangeData stream."""

    def __init__(self, key: ChannelKey, endpoint: str) -> None:
        self.key = key
        self.endpoint = endpoint
        self._credits = _Credits()
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        retrying = AsyncRetrying(
            stop=stop_after_delay(CONNECT_TIMEOUT_S),
            wait=wait_exponential_jitter(multiplier=0.05, max=1.0, jitter=0.1),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._connect()

    async def _connect(self) -> None:
        await self.abort()
        self._channel = grpc.aio.insecure_channel(self.endpoint)
        await asyncio.wait_for(self._channel.channel_ready(), 2.0)
        stub = fpb_grpc.DataExchangeServiceStub(self._channel)
        metadata = (
            (CHANNEL_METADATA_KEY, self.key.encode()),
            (BATCH_METADATA_KEY, "1"),
        )
        self._call = stub.ExchangeData(metadata=metadata)
        self._reader = asyncio.create_task(self._read_credits(self._call))

    async def _read_credits(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for payload in call:
                self._credits.grant(payload.credits.credits_granted)
        except grpc.aio.AioRpcError as exc:
            logger.debug("channel %s to %s ended: %s", self.key, self.endpoint, exc)
            # Without this a sender waiting for a credit would wait until the
            # coordinator cancels its task.
            self._credits.fail(
                f"channel {self.key} to {self.endpoint} broke: "
                f"{exc.code().name}: {exc.details()}"
            )
            return
        self._credits.fail(f"channel {self.key} to {self.endpoint} was closed")

    async def send(self, buffer: list[Element]) -> None:
        assert self._call is not None, "send before start"
        await self._credits.spend()
        payload = fpb.UpstreamPayload(record=to_data_record(self.key, buffer))
        await self._call.write(payload)

    async def close(self) -> None:
        assert self._call is not None, "close before start"
        await self.send([END_OF_INPUT])
        await self._call.done_writing()
        if self._reader is not None:
            await self._reader
        code = await self._call.code()
        if code != grpc.StatusCode.OK:
            raise ConnectionError(
                f"channel {self.key} to {self.endpoint} ended with {code.name}"
            )
        await self.abort()

    async def abort(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class StreamRejected(Exception):
    """A sender broke the exchange protocol; its stream ends with ``code``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _CreditOutbox:
    """Credits granted to one stream's sender and not yet sent to it.

    Grants that arrive while the previous update is being written are sent
    as one CreditUpdate, so a fast consumer does not cost a message per
    buffer.
    """

    def __init__(self) -> None:
        self.pending = 0
        self.changed = asyncio.Event()

    def grant(self, credits: int) -> None:
        self.pending += credits
        self.changed.set()


class DataExchange(fpb_grpc.DataExchangeServiceServicer):
    """Receives ExchangeData streams into this worker's input channels."""

    def __init__(self, registry: ChannelRegistry) -> None:
        self._registry = registry
        # ExchangeData streams accepted since the start, for monitoring.
        self.streams_opened = 0

    async def ExchangeData(
        self,
        request_iterator: AsyncIterator[fpb.UpstreamPayload],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[fpb.DownstreamPayload]:
        self.streams_opened += 1
        metadata = dict(context.invocation_metadata() or ())
        batched = metadata.get(BATCH_METADATA_KEY) == "1"
        channel = await self._named_channel(metadata, context)
        outbox = _CreditOutbox()
        if channel is not None:
            channel.attach(outbox.grant)
        else:
            outbox.grant(self._registry.buffers)
        pump = asyncio.create_task(
            self._pump(request_iterator, channel, batched, outbox)
        )
        pump.add_done_callback(lambda _: outbox.changed.set())
        try:
            async for granted in self._credit_stream(outbox, pump):
                yield granted
        except StreamRejected as exc:
            logger.warning("ExchangeData stream rejected: %s", exc)
            await context.abort(exc.code, str(exc))
        finally:
            pump.cancel()

    async def _named_channel(
        self, metadata: dict[str, Any], context: grpc.aio.ServicerContext
    ) -> InputChannel | None:
        """Return the channel the stream names, or None for an unnamed stream.

        Senders that name no channel (such as Flink.NET's) are routed by each
        record's target and source fields; see ``_route_unnamed``.
        """
        text = metadata.get(CHANNEL_METADATA_KEY)
        if text is None:
            return None
        try:
            return self._registry.get(ChannelKey.decode(text))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # context.abort raises; this keeps the type checker informed

    async def _credit_stream(
        self, outbox: _CreditOutbox, pump: asyncio.Task[None]
    ) -> AsyncIterator[fpb.DownstreamPayload]:
        while True:
            await outbox.changed.wait()
            outbox.changed.clear()
            if outbox.pending > 0:
                granted, outbox.pending = outbox.pending, 0
                yield fpb.DownstreamPayload(
                    credits=fpb.CreditUpdate(credits_granted=granted)
                )
            if pump.done():
                pump.result()
                return

    async def _pump(
        self,
        requests: AsyncIterator[fpb.UpstreamPayload],
        channel: InputChannel | None,
        batched: bool,
        outbox: _CreditOutbox,
    ) -> None:
        """Deliver what the sender writes; raise StreamRejected on a violation."""
        try:
            async for payload in requests:
                buffer = self._decode(payload.record, batched)
                if channel is None:
                    # The credit of an unnamed stream goes back to it when
                    # the task takes the buffer, whichever channel that is.
                    target = self._route_unnamed(payload.record)
                    target.deliver(buffer, outbox.grant)
                    continue
                if len(channel.buffers) >= channel.capacity:
                    raise StreamRejected(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the sender of channel {channel.key} sent without a "
                        f"credit: all {channel.capacity} buffers are full",
                    )
                channel.deliver(buffer)
        except (grpc.aio.AioRpcError, asyncio.CancelledError, StreamRejected) as exc:
            if channel is not None:
                channel.fail(f"the stream from upstream broke: {exc!r}")
            raise
        if channel is not None and not channel.ended:
            channel.fail("the stream from upstream ended without the end of input")

    @staticmethod
    def _decode(record: fpb.DataRecord, batched: bool) -> list[Element]:
        try:
            return from_data_record(record, batched)
        except (ValueError, TypeError) as exc:
            raise StreamRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid data_payload from {record.source_job_vertex_id}_"
                f"{record.source_subtask_index}: {exc}",
            ) from exc

    def _route_unnamed(self, record: fpb.DataRecord) -> InputChannel:
        keys = [
            key
            for key in self._registry.find_by_target(
                record.target_job_vertex_id, record.target_subtask_index
            )
            if (key.source_vertex_id, key.source_subtask_index)
            == (record.source_job_vertex_id, record.source_subtask_index)
        ]
        if not keys:
            raise StreamRejected(
                grpc.StatusCode.NOT_FOUND,
                f"no input channel of {record.target_job_vertex_id}_"
                f"{record.target_subtask_index} from {record.source_job_vertex_id}_"
                f"{record.source_subtask_index} on this worker",
            )
        newest = max(keys, key=lambda key: key.attempt)
        return self._registry.get(newest)


__all__ = [
    "END_OF_INPUT",
    "ChannelBroken",
    "ChannelKey",
    "ChannelRegistry",
    "DataExchange",
    "EndOfInput",
    "InputChannel",
    "LocalSender",
    "RemoteSender",
    "Sender",
    "StreamRejected",
]
