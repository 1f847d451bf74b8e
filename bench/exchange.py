"""Measure records per second through one ExchangeData stream.

Run ``python -m bench.exchange``, or add ``--quick`` for a shorter run. Each
case sends the same small records (a JSON object of three fields and an
event time) from a RecordWriter to an InputGate that counts them:

- stream: the writer runs in one process and sends through a RemoteSender,
  the gate runs in a second process, which receives through the worker's
  DataExchange servicer on a grpc.aio server on 127.0.0.1. Credits and
  batching are those of the worker.
- stream, one record per message: the same with a batch size of 1.
- in process: writer and gate share one event loop and pass the records
  through a LocalSender, the path between subtasks of one worker.

The rate is records divided by the time from the writer's first record to
the gate's end of input, both read from CLOCK_MONOTONIC, which every process
of a Linux machine shares. Each case runs a few times and reports the
median. Each case also reports the CPU time each process spent per record,
which depends less than the rate on what else runs on the machine. The last
line of the output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

import grpc

from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc
from worker.exchange import (
    DEFAULT_BUFFERS,
    ChannelKey,
    ChannelRegistry,
    DataExchange,
    InputChannel,
    LocalSender,
    RemoteSender,
    Sender,
)
from worker.gate import InputGate
from worker.records import Record
from worker.writer import DEFAULT_BATCH_SIZE, OutputEdge, RecordWriter

CHANNEL = ChannelKey("bench", "sink", 0, "source", 0, 1)

# Distinct records the writer cycles through, so that building them costs
# nothing during the run.
RECORD_POOL = 1024

# Seconds a receiver process may take to start, and a run to end.
START_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    records: int
    unbatched_records: int
    repetitions: int


FULL = Settings(records=1_000_000, unbatched_records=50_000, repetitions=3)
QUICK = Settings(records=200_000, unbatched_records=10_000, repetitions=2)


def clock() -> float:
    """Return seconds on the clock every process of this machine shares."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def cpu_seconds() -> float:
    """Return this process's user and system CPU time so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def record_pool() -> list[Record]:
    """Return the small records every case sends, about 45 bytes as JSON."""
    return [
        Record({"user": f"u{i % 100}", "amount": i % 7, "ts": 1_000 + i}, 1_000 + i)
        for i in range(RECORD_POOL)
    ]


# ------------------------------------------------------------------ both ends


async def produce(sender: Sender, records: int, batch_size: int) -> float:
    """Emit ``records`` records and the end of input; return the start time.

    Flushes whenever a batch is full, as a source task does.
    """
    pool = record_pool()
    edge = OutputEdge(CHANNEL.target_vertex_id, fpb.FORWARD, {0: sender}, None, 1)
    writer = RecordWriter([edge], batch_size=batch_size)
    started = clock()
    for index in range(records):
        writer.emit(pool[index % RECORD_POOL])
        if writer.has_full_batch():
            await writer.flush()
    await writer.flush()
    await sender.close()
    return started


async def consume(channel: InputChannel) -> tuple[int, float]:
    """Read one channel to its end; return the records and the end time."""
    gate = InputGate([channel])
    count = 0
    while True:
        element = await gate.next()
        if element is None:
            return count, clock()
        if isinstance(element, Record):
            count += 1


# ------------------------------------------------------------------ processes


async def run_receiver() -> None:
    """Serve DataExchange on 127.0.0.1, print the port, count, print the result."""
    registry = ChannelRegistry()
    server = grpc.aio.server()
    fpb_grpc.add_DataExchangeServiceServicer_to_server(DataExchange(registry), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = registry.get(CHANNEL)
    print(json.dumps({"port": port}), flush=True)
    cpu = cpu_seconds()
    count, ended = await consume(channel)
    figures = {"records": count, "ended": ended, "cpu_s": cpu_seconds() - cpu}
    print(json.dumps(figures), flush=True)
    await server.stop(1.0)


async def run_sender(port: int, records: int, batch_size: int) -> None:
    """Send to the receiver on ``port``; print the start time and CPU time."""
    sender = RemoteSender(CHANNEL, f"127.0.0.1:{port}")
    await sender.start()
    cpu = cpu_seconds()
    started = await produce(sender, records, batch_size)
    print(json.dumps({"started": started, "cpu_s": cpu_seconds() - cpu}), flush=True)


def _role_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.exchange", *args]


async def _last_json(process: asyncio.subprocess.Process) -> dict[str, Any]:
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(
            f"benchmark process exited with {process.returncode}: {stderr.decode()}"
        )
    figures: dict[str, Any] = json.loads(stdout.decode().splitlines()[-1])
    return figures


async def stream_once(records: int, batch_size: int) -> dict[str, float]:
    """Run one receiver and one sender process; return rate and CPU times."""
    receiver = await asyncio.create_subprocess_exec(
        *_role_command("--role", "receiver"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert receiver.stdout is not None
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            port = json.loads(await receiver.stdout.readline())["port"]
        command = _role_command(
            "--role", "sender", "--port", str(port), "--records", str(records)
        )
        sender = await asyncio.create_subprocess_exec(
            *command,
            "--batch-size",
            str(batch_size),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(RUN_TIMEOUT_S):
            sent, received = await asyncio.gather(
                _last_json(sender), _last_json(receiver)
            )
    finally:
        if receiver.returncode is None:
            receiver.kill()
            await receiver.wait()
    if received["records"] != records:
        raise RuntimeError(f"sent {records} records, received {received['records']}")
    elapsed = received["ended"] - sent["started"]
    return {
        "rate": records / elapsed,
        "sender_cores": sent["cpu_s"] / elapsed,
        "receiver_cores": received["cpu_s"] / elapsed,
        "sender_cpu_us": sent["cpu_s"] / records * 1e6,
        "receiver_cpu_us": received["cpu_s"] / records * 1e6,
    }


async def in_process_once(records: int) -> dict[str, float]:
    """Send through a LocalSender to a gate in this event loop; return the rate."""
    channel = InputChannel(CHANNEL, DEFAULT_BUFFERS)
    sender = LocalSender(channel)
    await sender.start()
    cpu = cpu_seconds()
    started, (count, ended) = await asyncio.gather(
        produce(sender, records, DEFAULT_BATCH_SIZE), consume(channel)
    )
    if count != records:
        raise RuntimeError(f"sent {records} records, received {count}")
    elapsed = ended - started
    cpu = cpu_seconds() - cpu
    return {
        "rate": records / elapsed,
        "cores": cpu / elapsed,
        "cpu_us": cpu / records * 1e6,
    }


# ------------------------------------------------------------------ report


def _median(runs: list[dict[str, float]], field: str) -> float:
    return statistics.median(run[field] for run in runs)


def _print_case(case: str, runs: list[dict[str, float]]) -> None:
    rates = " / ".join(f"{run['rate']:,.0f}" for run in runs)
    print(f"{case}: {_median(runs, 'rate'):,.0f} records/s (runs {rates})", flush=True)


async def measure(settings: Settings) -> dict[str, Any]:
    """Run every case, alternating them, and return the figures."""
    stream: list[dict[str, float]] = []
    unbatched: list[dict[str, float]] = []
    local: list[dict[str, float]] = []
    load_before = os.getloadavg()
    for _ in range(settings.repetitions):
        stream.append(await stream_once(settings.records, DEFAULT_BATCH_SIZE))
        local.append(await in_process_once(settings.records))
        unbatched.append(await stream_once(settings.unbatched_records, 1))
    load_after = os.getloadavg()

    _print_case("stream, batched", stream)
    _print_case("stream, one record per message", unbatched)
    _print_case("in process", local)

    stream_rate = _median(stream, "rate")
    return {
        "stream_records_per_s": round(stream_rate),
        "stream_sender_cores": round(_median(stream, "sender_cores"), 2),
        "stream_receiver_cores": round(_median(stream, "receiver_cores"), 2),
        "stream_sender_cpu_us_per_record": round(_median(stream, "sender_cpu_us"), 2),
        "stream_receiver_cpu_us_per_record": round(
            _median(stream, "receiver_cpu_us"), 2
        ),
        "stream_unbatched_records_per_s": round(_median(unbatched, "rate")),
        "in_process_records_per_s": round(_median(local, "rate")),
        "in_process_cores": round(_median(local, "cores"), 2),
        "in_process_cpu_us_per_record": round(_median(local, "cpu_us"), 2),
        "ratio_stream_to_in_process": round(stream_rate / _median(local, "rate"), 3),
        "load_average_before": round(load_before[0], 2),
        "load_average_after": round(load_after[0], 2),
    }


def run(settings: Settings, quick: bool) -> dict[str, Any]:
    """Measure and return the JSON figures of the whole run."""
    figures = asyncio.run(measure(settings))
    return {
        "benchmark": "exchange",
        "quick": quick,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "records": settings.records,
        "unbatched_records": settings.unbatched_records,
        "batch_size": DEFAULT_BATCH_SIZE,
        "buffers_per_channel": DEFAULT_BUFFERS,
        "repetitions": settings.repetitions,
        **figures,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.exchange",
        description="Measure records per second through one ExchangeData stream "
        "between two processes, against the in-process channel.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK.records:,} records per run in place of {FULL.records:,}",
    )
    # The roles of the two processes of a stream case, started by the benchmark.
    parser.add_argument(
        "--role",
        choices=("main", "receiver", "sender"),
        default="main",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--records", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "receiver":
        asyncio.run(run_receiver())
    elif args.role == "sender":
        asyncio.run(run_sender(args.port, args.records, args.batch_size))
    else:
        figures = run(QUICK if args.quick else FULL, args.quick)
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
