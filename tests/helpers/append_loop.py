"""Append events to a SQLite event log, printing each acknowledged seq.

The event log tests run this script as a subprocess: the crash test kills it
with SIGKILL at random moments, other tests let it append a fixed count. It
takes the lease (waiting while another holder's lease is live), then appends
batches of random sizes, several at once through ``asyncio.gather``. Every
stdout line is written and flushed in one call:

    ready EPOCH      the lease is taken at EPOCH
    ack SEQ DIGEST   SEQ is durable: printed only after ``append`` returned
    done             every one of ``--count`` events was acknowledged
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import sys
import time
from collections.abc import Sequence

from eventlog import Lease, SqliteEventLog, event_type
from protos import jobledger_events_pb2 as pb


def payload_digest(event: pb.Event) -> str:
    """Return the SHA-256 of an event's type and body, leaving out the envelope.

    The log sets seq, epoch and timestamp, so only the body identifies what
    the caller appended.
    """
    name = event_type(event)
    body = getattr(event, name).SerializeToString(deterministic=True)
    return hashlib.sha256(name.encode() + b"\0" + body).hexdigest()


def make_event(rng: random.Random, event_id: str) -> pb.Event:
    """Build an event of a random type, with a body of a random size."""
    event = pb.Event()
    kind = rng.randrange(3)
    # Some bodies span several 4 KiB database pages, so a kill can land
    # while a page of a large row is written.
    size = rng.choice([0, 16, 200, 1500]) if rng.random() < 0.95 else 20_000
    filler = rng.randbytes(size // 2).hex()
    if kind == 0:
        body = event.task_manager_registered
        body.task_manager_id = event_id
        body.address = filler
        body.port = rng.randrange(1, 65536)
        body.slots = rng.randrange(1, 64)
    elif kind == 1:
        event.job_status_changed.job_id = event_id
        event.job_status_changed.status = pb.JOB_RUNNING
        event.job_status_changed.reason = filler
    else:
        ack = event.checkpoint_acknowledged
        ack.checkpoint_id = rng.randrange(1, 1 << 40)
        ack.job_id = event_id
        ack.acknowledgement.snapshot_handle = filler
        for partition in range(rng.randrange(4)):
            ack.acknowledgement.source_offsets[f"p{partition}"] = rng.randrange(1 << 50)
    return event


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def take_lease(
    log: SqliteEventLog, holder: str, duration_s: float, deadline: float
) -> Lease:
    while time.monotonic() < deadline:
        lease = await log.acquire_lease(holder, "127.0.0.1:0", duration_s)
        if lease is not None:
            return lease
        await asyncio.sleep(0.05)
    raise TimeoutError(
        f"timed out waiting for the lease of {log.path} as holder {holder!r}: "
        "another holder's lease stayed live"
    )


async def append_loop(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.max_seconds
    async with SqliteEventLog(args.path) as log:
        lease = await take_lease(log, args.holder, args.lease_s, deadline)
        emit(f"ready {lease.epoch}")

        async def append_batch(batch: Sequence[pb.Event]) -> None:
            seqs = await log.append(batch, lease.epoch)
            for seq, event in zip(seqs, batch, strict=True):
                emit(f"ack {seq} {payload_digest(event)}")

        events_built = 0
        while time.monotonic() < deadline:
            if args.count and events_built >= args.count:
                break
            batches = []
            for _ in range(rng.randint(1, args.max_concurrency)):
                size = rng.randint(1, args.max_batch)
                if args.count:
                    size = min(size, args.count - events_built)
                if size <= 0:
                    break
                ids = [
                    f"{args.holder}-{args.seed}-{events_built + i}" for i in range(size)
                ]
                batches.append([make_event(rng, event_id) for event_id in ids])
                events_built += size
            await asyncio.gather(*(append_batch(batch) for batch in batches))
        if args.count and events_built >= args.count:
            emit("done")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the SQLite event log file")
    parser.add_argument("--holder", default="append-loop", help="lease holder id")
    parser.add_argument(
        "--lease-s", type=float, default=60.0, help="lease duration in seconds"
    )
    parser.add_argument(
        "--count",
        type=int,
        default=0,
        help="events to append, or 0 to append until killed or --max-seconds pass",
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=8, help="maximum appends at once"
    )
    parser.add_argument(
        "--max-batch", type=int, default=20, help="maximum events per append"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the event bodies")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="exit after this many seconds even if not killed",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(append_loop(parse_args(sys.argv[1:])))
