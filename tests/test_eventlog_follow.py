"""``follow`` on a SQLite event log that another process appends to."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from eventlog import SqliteEventLog
from protos import jobledger_events_pb2 as pb
from tests.helpers import run_append_loop
from tests.helpers.append_loop import payload_digest

COUNT = 60


async def test_follow_sees_other_process_appends(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    async with SqliteEventLog(path) as log:
        seen: list[pb.Event] = []
        all_seen = asyncio.Event()

        async def follow() -> None:
            async for event in log.follow():
                seen.append(event)
                # The writer's LeaderElected event comes first, then COUNT more.
                if len(seen) == COUNT + 1:
                    all_seen.set()

        follower = asyncio.create_task(follow())
        try:
            output = await run_append_loop(
                path, "--holder", "other-process", "--count", str(COUNT)
            )
            await asyncio.wait_for(all_seen.wait(), 20)
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

    assert output.done
    assert len(output.acks) == COUNT
    assert [event.seq for event in seen] == list(range(1, COUNT + 2))
    assert seen[0].HasField("leader_elected")
    assert seen[0].leader_elected.leader_id == "other-process"
    followed = {event.seq: payload_digest(event) for event in seen[1:]}
    assert followed == output.acks
    for event in seen:
        assert event.epoch == output.epoch


async def test_follow_from_middle_of_other_log(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    first = await run_append_loop(
        path, "--holder", "first", "--count", "10", "--lease-s", "0.2"
    )
    async with SqliteEventLog(path) as log:
        seen: list[pb.Event] = []
        enough = asyncio.Event()
        # Seqs 1 to 11 exist. The second run adds its LeaderElected and 10 more.
        from_seq = 6

        async def follow() -> None:
            async for event in log.follow(from_seq):
                seen.append(event)
                if event.seq == 22:
                    enough.set()

        follower = asyncio.create_task(follow())
        try:
            second = await run_append_loop(
                path, "--holder", "second", "--count", "10", "--seed", "1"
            )
            await asyncio.wait_for(enough.wait(), 20)
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

    assert [event.seq for event in seen] == list(range(from_seq, 23))
    expected = {**first.acks, **second.acks}
    for event in seen:
        if event.seq in expected:
            assert payload_digest(event) == expected[event.seq]
    assert seen[12 - from_seq].HasField("leader_elected")
    assert seen[12 - from_seq].epoch == second.epoch
