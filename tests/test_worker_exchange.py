"""Input gates, barrier alignment and credit-based flow control."""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc
from worker.exchange import (
    CHANNEL_METADATA_KEY,
    END_OF_INPUT_OPTION,
    ChannelBroken,
    ChannelKey,
    ChannelRegistry,
    DataExchange,
    InputChannel,
    LocalSender,
    RemoteSender,
    Sender,
)
from worker.gate import InputGate
from worker.operators.base import key_selector
from worker.records import END_OF_INPUT, Barrier, Element, Record, Watermark
from worker.writer import OutputEdge, RecordWriter, key_hash


def key(source_index: int = 0) -> ChannelKey:
    return ChannelKey("job", "sink", 0, "src", source_index, 1)


def channel(source_index: int, *buffers: list[Element]) -> InputChannel:
    result = InputChannel(key(source_index), buffers=16)
    for buffer in buffers:
        result.deliver(buffer)
    return result


async def drain(gate: InputGate) -> list[Element]:
    elements = []
    async with asyncio.timeout(5):
        while (element := await gate.next()) is not None:
            elements.append(element)
    return elements


async def test_gate_aligns_barriers() -> None:
    barrier = Barrier(1, 0)
    a = channel(0, [Record("a1")], [barrier], [Record("a2")], [END_OF_INPUT])
    b = channel(1, [Record("b1")], [Record("b2")], [barrier], [END_OF_INPUT])
    elements = await drain(InputGate([a, b]))
    position = elements.index(barrier)
    assert elements.count(barrier) == 1
    assert {Record("a1").value, "b1", "b2"} == {
        e.value for e in elements[:position] if isinstance(e, Record)
    }
    assert elements[position + 1 :] == [Record("a2")]


async def test_gate_end_of_input_completes_alignment() -> None:
    barrier = Barrier(2, 0)
    a = channel(0, [barrier], [Record("after")], [END_OF_INPUT])
    b = channel(1, [Record("before")], [END_OF_INPUT])
    elements = await drain(InputGate([a, b]))
    assert elements == [Record("before"), barrier, Record("after")]


async def test_gate_newer_barrier_abandons_older() -> None:
    a = channel(0, [Barrier(1, 0)], [Barrier(2, 0)], [END_OF_INPUT])
    b = channel(1, [Barrier(2, 0)], [END_OF_INPUT])
    elements = await drain(InputGate([a, b]))
    assert elements == [Barrier(2, 0)]


async def test_gate_watermark_is_minimum() -> None:
    a = channel(0, [Watermark(10)], [Watermark(30)])
    b = channel(1, [Watermark(20)], [Watermark(40)])
    a.deliver([END_OF_INPUT])
    b.deliver([END_OF_INPUT])
    elements = await drain(InputGate([a, b]))
    marks = [e.timestamp for e in elements if isinstance(e, Watermark)]
    # The minimum over live channels; an ended channel no longer counts.
    assert marks == [10, 20, 30, 40]


async def test_gate_broken_channel_raises() -> None:
    a = channel(0, [Record("x")])
    gate = InputGate([a])
    assert await gate.next() == Record("x")
    a.fail("connection reset")
    with pytest.raises(ChannelBroken, match="src_0 broke: connection reset"):
        await gate.next()


async def test_local_sender_waits_for_credit() -> None:
    target = InputChannel(key(), buffers=2)
    sender = LocalSender(target)
    await sender.start()
    await sender.send([Record(1)])
    await sender.send([Record(2)])
    blocked = asyncio.create_task(sender.send([Record(3)]))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    assert len(target.buffers) == 2
    assert target.take() == [Record(1)]
    async with asyncio.timeout(5):
        await blocked
    assert len(target.buffers) == 2


@pytest.fixture
async def exchange() -> AsyncIterator[tuple[ChannelRegistry, int]]:
    registry = ChannelRegistry(buffers=4)
    server = grpc.aio.server()
    fpb_grpc.add_DataExchangeServiceServicer_to_server(DataExchange(registry), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield registry, port
    await server.stop(0)


async def test_slow_consumer_bounds_remote_sender(
    exchange: tuple[ChannelRegistry, int],
) -> None:
    registry, port = exchange
    sender = RemoteSender(key(), f"127.0.0.1:{port}")
    await sender.start()

    async def produce() -> None:
        for i in range(20):
            await sender.send([Record(i), Record(i + 100)])
        await sender.close()

    producing = asyncio.create_task(produce())
    await asyncio.sleep(0.3)
    target = registry.get(key())
    assert len(target.buffers) <= 4
    assert not producing.done()
    received = []
    async with asyncio.timeout(10):
        while not received or received[-1] is not END_OF_INPUT:
            buffer = target.take()
            if buffer is None:
                await asyncio.sleep(0.01)
                continue
            assert len(target.buffers) <= 4
            received.extend(buffer)
        await producing
    values = [e.value for e in received if isinstance(e, Record)]
    assert values == [v for i in range(20) for v in (i, i + 100)]


async def test_unbatched_sender_is_read(exchange: tuple[ChannelRegistry, int]) -> None:
    registry, port = exchange
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as grpc_channel:
        stub = fpb_grpc.DataExchangeServiceStub(grpc_channel)
        call = stub.ExchangeData(metadata=((CHANNEL_METADATA_KEY, key().encode()),))
        credits = await call.read()
        assert credits.credits.credits_granted == 4
        for value in ({"a": 1}, {"v": 2, "t": 5}):
            record = fpb.DataRecord(data_payload=json.dumps(value).encode())
            await call.write(fpb.UpstreamPayload(record=record))
        end = fpb.DataRecord(checkpoint_options=END_OF_INPUT_OPTION)
        await call.write(fpb.UpstreamPayload(record=end))
        await call.done_writing()
        while await call.read() != grpc.aio.EOF:
            pass
    target = registry.get(key())
    assert target.take() == [Record({"a": 1})]
    assert target.take() == [Record(2, 5)]
    assert target.take() == [END_OF_INPUT]


async def test_broken_stream_fails_channel(
    exchange: tuple[ChannelRegistry, int],
) -> None:
    registry, port = exchange
    sender = RemoteSender(key(), f"127.0.0.1:{port}")
    await sender.start()
    await sender.send([Record(1)])
    await sender.abort()
    target = registry.get(key())
    async with asyncio.timeout(5):
        while target.failure is None:
            await asyncio.sleep(0.01)
    assert target.take() == [Record(1)]


async def test_sender_fails_when_receiver_stops() -> None:
    registry = ChannelRegistry(buffers=2)
    server = grpc.aio.server()
    fpb_grpc.add_DataExchangeServiceServicer_to_server(DataExchange(registry), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sender = RemoteSender(key(), f"127.0.0.1:{port}")
    await sender.start()
    await sender.send([Record(1)])
    await sender.send([Record(2)])
    waiting = asyncio.create_task(sender.send([Record(3)]))
    # The receiving worker goes away while the sender waits for a credit.
    await server.stop(0)
    with pytest.raises(ConnectionError, match="broke"):
        async with asyncio.timeout(10):
            await waiting
    await sender.abort()


class RecordingSender(Sender):
    def __init__(self) -> None:
        self.buffers: list[list[Element]] = []

    async def send(self, buffer: list[Element]) -> None:
        self.buffers.append(buffer)


def edge(mode: int, count: int, selector: str = "") -> tuple[OutputEdge, list[Any]]:
    senders = [RecordingSender() for _ in range(count)]
    key_of = key_selector(selector, "key") if selector else None
    indexed: dict[int, Sender] = dict(enumerate(senders))
    return OutputEdge("down", mode, indexed, key_of, count), senders


async def test_writer_hash_routes_by_stable_key() -> None:
    hashed, senders = edge(fpb.HASH, 3, "tests.worker_helpers.functions:user_key")
    writer = RecordWriter([hashed], batch_size=2)
    for user in ("ann", "bob", "Ann", "cid", "ann"):
        writer.emit(Record({"user": user}))
    writer.emit_watermark(5)
    await writer.flush()
    for index, sender in enumerate(senders):
        users = [
            e.value["user"] for b in sender.buffers for e in b if isinstance(e, Record)
        ]
        assert all(key_hash(u.upper()) % 3 == index for u in users)
        assert sender.buffers[-1] == [Watermark(5)]
        assert all(len(b) <= 2 for b in sender.buffers)
    assert key_hash("ANN") == zlib.crc32(b"'ANN'")
    assert writer.records_out == 5


async def test_writer_broadcast_and_rescale() -> None:
    broadcast, everyone = edge(fpb.BROADCAST, 2)
    rescale, each = edge(fpb.RESCALE, 2)
    writer = RecordWriter([broadcast, rescale], batch_size=10)
    for value in range(4):
        writer.emit(Record(value))
    writer.broadcast(Barrier(1, 0))
    await writer.flush()
    assert [s.buffers for s in everyone] == [
        [[Record(0), Record(1), Record(2), Record(3)], [Barrier(1, 0)]]
    ] * 2
    assert [s.buffers[0] for s in each] == [
        [Record(0), Record(2)],
        [Record(1), Record(3)],
    ]


def unnamed_record(value: Any, source_index: int = 1) -> fpb.UpstreamPayload:
    """Return one record as a sender that names no channel writes it."""
    record = fpb.DataRecord(
        target_job_vertex_id="sink",
        target_subtask_index=0,
        source_job_vertex_id="src",
        source_subtask_index=source_index,
        data_payload=json.dumps(value).encode(),
    )
    return fpb.UpstreamPayload(record=record)


async def test_unnamed_sender_routed_by_fields(
    exchange: tuple[ChannelRegistry, int],
) -> None:
    registry, port = exchange
    target = registry.get(key(1))
    received: list[Element] = []

    async def consume() -> None:
        while len(received) < 10:
            assert len(target.buffers) <= 4
            buffer = target.take()
            if buffer is None:
                await asyncio.sleep(0.005)
                continue
            received.extend(buffer)

    consumer = asyncio.create_task(consume())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as grpc_channel:
        call = fpb_grpc.DataExchangeServiceStub(grpc_channel).ExchangeData()
        credits = 0
        async with asyncio.timeout(10):
            # One record per message, each spending a credit, as a sender
            # without batching does.
            for value in range(10):
                while credits == 0:
                    reply = await call.read()
                    assert reply != grpc.aio.EOF
                    credits += reply.credits.credits_granted
                await call.write(unnamed_record(value))
                credits -= 1
            await consumer
        await call.done_writing()
    assert received == [Record(value) for value in range(10)]
    assert target.failure is None


async def test_unnamed_sender_bounded_by_consumer(
    exchange: tuple[ChannelRegistry, int],
) -> None:
    registry, port = exchange
    target = registry.get(key(1))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as grpc_channel:
        call = fpb_grpc.DataExchangeServiceStub(grpc_channel).ExchangeData()
        granted: list[int] = []

        async def read_credits() -> None:
            while (reply := await call.read()) != grpc.aio.EOF:
                granted.append(reply.credits.credits_granted)

        reader = asyncio.create_task(read_credits())
        async with asyncio.timeout(5):
            while not granted:
                await asyncio.sleep(0.005)
        assert granted == [4]
        for value in range(4):
            await call.write(unnamed_record(value))
        async with asyncio.timeout(5):
            while len(target.buffers) < 4:
                await asyncio.sleep(0.005)
        # Nothing was taken, so no credit may come back yet.
        await asyncio.sleep(0.3)
        assert granted == [4]
        assert target.take() == [Record(0)]
        async with asyncio.timeout(5):
            while len(granted) < 2:
                await asyncio.sleep(0.005)
        assert granted == [4, 1]
        call.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def final_status(call: Any) -> grpc.StatusCode:
    """Read a stream's replies to its end, then return its status."""
    # The status arrives after the replies the server sent, so read them.
    with contextlib.suppress(grpc.aio.AioRpcError):
        while await call.read() != grpc.aio.EOF:
            pass
    code: grpc.StatusCode = await call.code()
    return code


async def test_sender_without_credit_rejected(
    exchange: tuple[ChannelRegistry, int],
) -> None:
    registry, port = exchange
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as grpc_channel:
        stub = fpb_grpc.DataExchangeServiceStub(grpc_channel)
        call = stub.ExchangeData(metadata=((CHANNEL_METADATA_KEY, key().encode()),))
        for value in range(5):
            record = fpb.DataRecord(data_payload=json.dumps(value).encode())
            await call.write(fpb.UpstreamPayload(record=record))
        async with asyncio.timeout(5):
            code = await final_status(call)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "sent without a credit" in await call.details()
    target = registry.get(key())
    assert len(target.buffers) == 4
    assert target.failure is not None


@pytest.mark.parametrize(
    ("named", "payload", "code"),
    [
        (True, b"{not json", grpc.StatusCode.INVALID_ARGUMENT),
        (True, b'{"v": 1, "t": "noon"}', grpc.StatusCode.INVALID_ARGUMENT),
        (False, b"1", grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_bad_stream_fails_channel(
    exchange: tuple[ChannelRegistry, int],
    named: bool,
    payload: bytes,
    code: grpc.StatusCode,
) -> None:
    registry, port = exchange
    target = registry.get(key())
    metadata = ((CHANNEL_METADATA_KEY, key().encode()),) if named else ()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as grpc_channel:
        stub = fpb_grpc.DataExchangeServiceStub(grpc_channel)
        call = stub.ExchangeData(metadata=metadata)
        # An unnamed record from a subtask that feeds no channel here.
        record = fpb.DataRecord(
            target_job_vertex_id="sink",
            source_job_vertex_id="src",
            source_subtask_index=9,
            data_payload=payload,
        )
        await call.write(fpb.UpstreamPayload(record=record))
        async with asyncio.timeout(5):
            assert await final_status(call) == code
    if named:
        # The task reading the channel fails rather than waiting forever.
        assert target.failure is not None
        assert "invalid data_payload" in target.failure
