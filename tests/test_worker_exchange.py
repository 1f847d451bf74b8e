"""Input gates, barrier alignment and credit-based flow control."""

from __future__ import annotations

import asyncio
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


async def test_unnamed_sender_routed_by_fields(
    exchange: tuple[ChannelRegistry, int],
) -> None:
    registry, port = exchange
    target = registry.get(key(1))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as grpc_channel:
        stub = fpb_grpc.DataExchangeServiceStub(grpc_channel)
        call = stub.ExchangeData()
        for value in range(6):
            record = fpb.DataRecord(
                target_job_vertex_id="sink",
                target_subtask_index=0,
                source_job_vertex_id="src",
                source_subtask_index=1,
                data_payload=json.dumps(value).encode(),
            )
            await call.write(fpb.UpstreamPayload(record=record))
        await call.done_writing()
        granted = 0
        while (reply := await call.read()) != grpc.aio.EOF:
            granted += reply.credits.credits_granted
    # The initial credits, then one back per delivered message.
    assert granted == 4 + 6
    received = [target.take() for _ in range(6)]
    assert received == [[Record(value)] for value in range(6)]
    assert target.failure is None
