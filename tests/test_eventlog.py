"""Contract tests of the event log: lease, fencing, appends, reads, snapshots.

Tests that take the ``logs`` or ``log`` fixture run against both backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from eventlog import (
    AppendError,
    CompactedError,
    EventDecodeError,
    EventLog,
    FencedError,
    Lease,
    LogClosedError,
    LogOpenError,
    SqliteEventLog,
    now_ms,
)
from protos import jobledger_events_pb2 as pb
from tests.helpers import (
    BACKENDS,
    LogFactory,
    lost_event,
    read_all,
    registered_event,
    run_append_loop,
)

LONG_LEASE_S = 30.0
SHORT_LEASE_S = 0.2


@pytest.fixture(params=BACKENDS)
async def logs(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[LogFactory]:
    factory = LogFactory(request.param, tmp_path / "events.db")
    yield factory
    await factory.close_all()


@pytest.fixture
async def log(logs: LogFactory) -> EventLog:
    return await logs.open()


async def wait_until_expired(log: EventLog) -> None:
    deadline = time.monotonic() + 10
    while (await log.leader()).is_live(now_ms()):
        assert time.monotonic() < deadline, "lease did not expire within 10 s"
        await asyncio.sleep(0.05)


def registered_ids(events: list[pb.Event]) -> list[str]:
    return [
        event.task_manager_registered.task_manager_id
        for event in events
        if event.HasField("task_manager_registered")
    ]


# ---------------------------------------------------------------- lease


async def test_acquire_lease_fresh_log(log: EventLog) -> None:
    lease = await log.acquire_lease("a", "127.0.0.1:6123", LONG_LEASE_S)

    assert lease is not None
    assert lease.holder == "a"
    assert lease.epoch == 1
    assert lease.expires_ms > now_ms()
    leader = await log.leader()
    assert leader.holder == "a"
    assert leader.address == "127.0.0.1:6123"
    assert leader.epoch == 1
    assert leader.expires_ms == lease.expires_ms


async def test_acquire_lease_appends_leader_elected(log: EventLog) -> None:
    await log.acquire_lease("a", "127.0.0.1:6123", LONG_LEASE_S)

    events = await read_all(log)
    assert len(events) == 1
    elected = events[0]
    assert elected.seq == 1
    assert elected.epoch == 1
    assert elected.HasField("leader_elected")
    assert elected.leader_elected.leader_id == "a"
    assert elected.leader_elected.address == "127.0.0.1:6123"
    assert elected.leader_elected.epoch == 1
    assert elected.HasField("timestamp")


async def test_acquire_live_lease_returns_none(logs: LogFactory) -> None:
    writer_a = await logs.open()
    writer_b = await logs.open()
    await writer_a.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
    leader_before = await writer_a.leader()

    lease_b = await writer_b.acquire_lease("b", "127.0.0.1:2", LONG_LEASE_S)

    assert lease_b is None
    assert await writer_b.last_seq() == 1
    assert await writer_b.leader() == leader_before


async def test_acquire_empty_holder_raises(log: EventLog) -> None:
    with pytest.raises(ValueError, match="holder"):
        await log.acquire_lease("", "127.0.0.1:1", LONG_LEASE_S)

    assert await log.last_seq() == 0


async def test_takeover_after_expiry_fences_writer(logs: LogFactory) -> None:
    writer_a = await logs.open()
    writer_b = await logs.open()
    lease_a = await writer_a.acquire_lease("a", "127.0.0.1:1", SHORT_LEASE_S)
    assert lease_a is not None
    await writer_a.append([registered_event("before-takeover")], lease_a.epoch)
    await wait_until_expired(writer_b)

    lease_b = await writer_b.acquire_lease("b", "127.0.0.1:2", LONG_LEASE_S)
    assert lease_b is not None
    assert lease_b.epoch == lease_a.epoch + 1
    last_before = await writer_b.last_seq()

    for attempt in range(3):
        with pytest.raises(FencedError) as raised:
            await writer_a.append(
                [registered_event(f"fenced-{attempt}")], lease_a.epoch
            )
        assert raised.value.writer_epoch == lease_a.epoch
        assert raised.value.log_epoch == lease_b.epoch

    assert await writer_b.last_seq() == last_before
    assert registered_ids(await read_all(writer_b)) == ["before-takeover"]
    assert await writer_a.renew_lease(lease_a, LONG_LEASE_S) is None
    assert (await writer_b.leader()).holder == "b"


async def test_takeover_after_release(logs: LogFactory) -> None:
    writer_a = await logs.open()
    writer_b = await logs.open()
    lease_a = await writer_a.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
    assert lease_a is not None

    await writer_a.release_lease(lease_a)
    lease_b = await writer_b.acquire_lease("b", "127.0.0.1:2", LONG_LEASE_S)

    assert lease_b is not None
    assert lease_b.epoch == lease_a.epoch + 1
    with pytest.raises(FencedError):
        await writer_a.append([registered_event("after-release")], lease_a.epoch)
    assert registered_ids(await read_all(writer_b)) == []


async def test_release_after_takeover_keeps_leader(logs: LogFactory) -> None:
    writer_a = await logs.open()
    writer_b = await logs.open()
    lease_a = await writer_a.acquire_lease("a", "127.0.0.1:1", SHORT_LEASE_S)
    assert lease_a is not None
    await wait_until_expired(writer_b)
    lease_b = await writer_b.acquire_lease("b", "127.0.0.1:2", LONG_LEASE_S)
    assert lease_b is not None

    await writer_a.release_lease(lease_a)

    leader = await writer_b.leader()
    assert leader.holder == "b"
    assert leader.epoch == lease_b.epoch
    assert leader.expires_ms == lease_b.expires_ms


async def test_renew_lease_extends_expiry(log: EventLog) -> None:
    lease = await log.acquire_lease("a", "127.0.0.1:1", 1.0)
    assert lease is not None

    renewed = await log.renew_lease(lease, LONG_LEASE_S)

    assert renewed is not None
    assert renewed.epoch == lease.epoch
    assert renewed.holder == lease.holder
    assert renewed.expires_ms > lease.expires_ms
    assert (await log.leader()).expires_ms == renewed.expires_ms
    assert await log.last_seq() == 1


async def test_epochs_grow_by_one(logs: LogFactory) -> None:
    writer_a = await logs.open()
    writer_b = await logs.open()
    epochs = []
    for round_number in range(3):
        for holder, writer in (("a", writer_a), ("b", writer_b)):
            lease = await writer.acquire_lease(holder, f"127.0.0.1:{round_number}", 30)
            assert lease is not None
            epochs.append(lease.epoch)
            await writer.append(
                [registered_event(f"{holder}-{lease.epoch}")], lease.epoch
            )
            await writer.release_lease(lease)

    assert epochs == [1, 2, 3, 4, 5, 6]
    events = await read_all(writer_a)
    elected = [event for event in events if event.HasField("leader_elected")]
    assert [event.leader_elected.epoch for event in elected] == epochs
    assert [event.epoch for event in elected] == epochs
    assert [event.leader_elected.leader_id for event in elected] == list("ababab")
    appended = [event for event in events if event.HasField("task_manager_registered")]
    assert [event.epoch for event in appended] == epochs


async def test_reacquire_by_holder_fences_old_epoch(log: EventLog) -> None:
    first = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
    assert first is not None

    second = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)

    assert second is not None
    assert second.epoch == first.epoch + 1
    with pytest.raises(FencedError):
        await log.append([registered_event("old-epoch")], first.epoch)
    seqs = await log.append([registered_event("new-epoch")], second.epoch)
    assert seqs == [3]
    assert await log.renew_lease(first, LONG_LEASE_S) is None


async def test_fencing_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    async with SqliteEventLog(path) as writer_a:
        lease_a = await writer_a.acquire_lease("a", "127.0.0.1:1", SHORT_LEASE_S)
        assert lease_a is not None
        await writer_a.append([registered_event("a-before")], lease_a.epoch)
        await wait_until_expired(writer_a)

        output = await run_append_loop(path, "--holder", "b", "--count", "3")

        assert output.epoch == lease_a.epoch + 1
        assert output.done
        with pytest.raises(FencedError) as raised:
            await writer_a.append([registered_event("a-after")], lease_a.epoch)
        assert raised.value.log_epoch == output.epoch
        assert await writer_a.renew_lease(lease_a, LONG_LEASE_S) is None
        events = await read_all(writer_a)
        assert registered_ids(events).count("a-after") == 0
        assert [event.seq for event in events] == [1, 2, 3, 4, 5, 6]
        assert sorted(output.acks) == [4, 5, 6]
        assert (await writer_a.leader()).holder == "b"


# ---------------------------------------------------------------- appends


async def test_append_returns_contiguous_seqs(log: EventLog) -> None:
    lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
    assert lease is not None

    first = await log.append(
        [registered_event("x"), registered_event("y")], lease.epoch
    )
    second = await log.append([registered_event("z")], lease.epoch)

    assert first == [2, 3]
    assert second == [4]
    assert await log.last_seq() == 4
    assert registered_ids(await read_all(log)) == ["x", "y", "z"]


async def test_append_sets_envelope_not_caller(log: EventLog) -> None:
    lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
    assert lease is not None
    unstamped = registered_event("unstamped")
    stamped = registered_event("stamped")
    stamped.timestamp.FromMilliseconds(1_000_000)
    before_ms = now_ms()

    await log.append([unstamped, stamped], lease.epoch)

    assert unstamped.seq == 0
    assert unstamped.epoch == 0
    assert not unstamped.HasField("timestamp")
    events = await read_all(log, 2)
    assert [event.seq for event in events] == [2, 3]
    assert [event.epoch for event in events] == [lease.epoch, lease.epoch]
    assert events[0].timestamp.ToMilliseconds() >= before_ms
    assert events[1].timestamp.ToMilliseconds() == 1_000_000


async def test_append_without_body_writes_nothing(log: EventLog) -> None:
    lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
    assert lease is not None

    with pytest.raises(ValueError, match="body"):
        await log.append([registered_event("valid"), pb.Event()], lease.epoch)

    assert await log.last_seq() == 1
    assert registered_ids(await read_all(log)) == []


async def test_append_empty_batch_returns_empty(log: EventLog) -> None:
    lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
    assert lease is not None

    assert await log.append([], lease.epoch) == []
    assert await log.last_seq() == 1


async def test_concurrent_appends_follow_arrival_order(log: EventLog) -> None:
    lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
    assert lease is not None
    rng = random.Random(7)
    arrivals: list[int] = []
    batches = [
        [registered_event(f"task{task}-{i}") for i in range(rng.randint(1, 5))]
        for task in range(200)
    ]

    async def append_after_delay(task: int) -> list[int]:
        # Random delays mix arrival order with creation order, and spread
        # the appends over several group commits.
        await asyncio.sleep(rng.uniform(0, 0.02))
        arrivals.append(task)
        return await log.append(batches[task], lease.epoch)

    results = await asyncio.wait_for(
        asyncio.gather(*(append_after_delay(task) for task in range(200))), 30
    )

    for task, seqs in enumerate(results):
        assert len(seqs) == len(batches[task])
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    first_seqs = [results[task][0] for task in arrivals]
    assert first_seqs == sorted(first_seqs)
    all_seqs = sorted(seq for seqs in results for seq in seqs)
    assert all_seqs == list(range(2, 2 + sum(len(batch) for batch in batches)))
    stored = {event.seq: event for event in await read_all(log)}
    for task, seqs in enumerate(results):
        assert [
            stored[seq].task_manager_registered.task_manager_id for seq in seqs
        ] == [event.task_manager_registered.task_manager_id for event in batches[task]]


async def test_small_group_commits_keep_order(tmp_path: Path) -> None:
    async with SqliteEventLog(tmp_path / "events.db", max_batch_events=3) as log:
        lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
        assert lease is not None
        batches = [
            [registered_event(f"{task}-{i}") for i in range(task % 4 + 1)]
            for task in range(40)
        ]

        results = await asyncio.wait_for(
            asyncio.gather(*(log.append(batch, lease.epoch) for batch in batches)), 30
        )

        expected_ids = [
            event.task_manager_registered.task_manager_id
            for batch in batches
            for event in batch
        ]
        assert registered_ids(await read_all(log)) == expected_ids
        flat = [seq for seqs in results for seq in seqs]
        assert flat == list(range(2, 2 + len(expected_ids)))


def install_failing_trigger(path: Path, type_name: str) -> None:
    """Make SQLite abort every insert of a ``type_name`` event: a real failed commit."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(
            f"CREATE TRIGGER reject_{type_name} BEFORE INSERT ON events"
            f" WHEN NEW.type = '{type_name}'"
            " BEGIN SELECT RAISE(ABORT, 'insert rejected by test trigger'); END"
        )
        conn.commit()


def drop_failing_trigger(path: Path, type_name: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"DROP TRIGGER reject_{type_name}")
        conn.commit()


async def test_failed_commit_fails_whole_batch(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    async with SqliteEventLog(path) as log:
        lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
        assert lease is not None
        await log.append([registered_event("kept")], lease.epoch)
        install_failing_trigger(path, "task_manager_lost")

        # The failing event is in the first append, so the others share its
        # group commit or queue behind it, and either way they must fail.
        results = await asyncio.wait_for(
            asyncio.gather(
                log.append(
                    [registered_event("b1"), lost_event("b1", "failing")], lease.epoch
                ),
                log.append([registered_event("b2")], lease.epoch),
                log.append(
                    [registered_event("b3"), registered_event("b4")], lease.epoch
                ),
                return_exceptions=True,
            ),
            30,
        )

        for result in results:
            assert isinstance(result, AppendError)
        assert await log.last_seq() == 2
        assert registered_ids(await read_all(log)) == ["kept"]


async def test_failed_commit_poisons_epoch(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    async with SqliteEventLog(path) as log:
        lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
        assert lease is not None
        install_failing_trigger(path, "task_manager_lost")
        with pytest.raises(AppendError):
            await log.append([lost_event("x", "failing")], lease.epoch)
        drop_failing_trigger(path, "task_manager_lost")

        with pytest.raises(AppendError):
            await log.append([registered_event("same-epoch")], lease.epoch)
        assert await log.last_seq() == 1
        assert (await log.leader()).epoch == lease.epoch

        new_lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
        assert new_lease is not None
        assert await log.append([registered_event("new-epoch")], new_lease.epoch) == [3]
        assert registered_ids(await read_all(log)) == ["new-epoch"]


async def test_queued_appends_fail_after_failed_commit(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    async with SqliteEventLog(path, max_batch_events=1) as log:
        lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
        assert lease is not None
        install_failing_trigger(path, "task_manager_lost")

        # One event per group commit: the appends queued behind the failing
        # one commit separately and must not land either.
        results = await asyncio.wait_for(
            asyncio.gather(
                log.append([lost_event("x", "failing")], lease.epoch),
                *(
                    log.append([registered_event(f"queued-{i}")], lease.epoch)
                    for i in range(5)
                ),
                return_exceptions=True,
            ),
            30,
        )

        for result in results:
            assert isinstance(result, AppendError)
        assert await log.last_seq() == 1


async def test_commit_delay_gathers_trickling_appends(tmp_path: Path) -> None:
    async with SqliteEventLog(tmp_path / "events.db", commit_delay_s=0.5) as log:
        lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
        assert lease is not None
        before = log.commits
        appends = []
        # Appends arriving one by one, as RPC handlers make them, not
        # waiting for each other.
        for i in range(30):
            appends.append(
                asyncio.ensure_future(
                    log.append([registered_event(f"tm-{i}")], lease.epoch)
                )
            )
            await asyncio.sleep(0.002)
        results = await asyncio.wait_for(asyncio.gather(*appends), 30)

        assert [seqs[0] for seqs in results] == list(range(2, 32))
        # Without the delay each append could be a commit of its own.
        assert log.commits - before <= 6


async def test_commit_delay_stops_when_writers_wait(tmp_path: Path) -> None:
    # One caller that waits for each append gains nothing from a delay, so
    # the log stops delaying after the first delay gathered nothing.
    async with SqliteEventLog(tmp_path / "events.db", commit_delay_s=1.0) as log:
        lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
        assert lease is not None
        started = time.monotonic()
        for i in range(12):
            await log.append([registered_event(f"tm-{i}")], lease.epoch)
        elapsed = time.monotonic() - started

    # Twelve delays would take 12 s.
    assert elapsed < 6.0, f"12 sequential appends took {elapsed:.1f} s"


async def test_commit_delay_ends_when_queue_fills(tmp_path: Path) -> None:
    async with SqliteEventLog(tmp_path / "events.db", commit_delay_s=60.0) as log:
        lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
        assert lease is not None
        first = asyncio.ensure_future(
            log.append([registered_event("first")], lease.epoch)
        )
        # The writer delays the commit of the first append by up to 60 s ...
        await asyncio.sleep(0.1)
        assert not first.done()
        # ... until enough appends wait for one commit to pay.
        rest = [
            log.append([registered_event(f"tm-{i}")], lease.epoch) for i in range(80)
        ]
        results = await asyncio.wait_for(asyncio.gather(first, *rest), 20)

    assert [seqs[0] for seqs in results] == list(range(2, 83))


async def test_negative_commit_delay_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid commit delay -1"):
        SqliteEventLog(tmp_path / "events.db", commit_delay_s=-1)


@pytest.mark.parametrize("delay", [math.nan, math.inf])
async def test_non_finite_commit_delay_raises(tmp_path: Path, delay: float) -> None:
    with pytest.raises(ValueError, match=f"invalid commit delay {delay}"):
        SqliteEventLog(tmp_path / "events.db", commit_delay_s=delay)


async def test_close_ends_commit_delay(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    log = SqliteEventLog(path, commit_delay_s=60.0)
    await log.open()
    lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
    assert lease is not None
    delayed = [
        asyncio.ensure_future(log.append([registered_event(f"tm-{i}")], lease.epoch))
        for i in range(3)
    ]
    # The writer delays their commit by up to 60 s ...
    await asyncio.sleep(0.1)
    assert not any(append.done() for append in delayed)
    # ... but closing the log ends the delay: they are committed, not failed.
    await log.close()
    results = await asyncio.gather(*delayed, return_exceptions=True)

    assert results == [[2], [3], [4]]
    async with SqliteEventLog(path) as reopened:
        assert registered_ids(await read_all(reopened)) == ["tm-0", "tm-1", "tm-2"]


async def test_writer_failure_fails_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A defect that ends the writer task cannot be provoked through SQLite,
    # so taking a batch raises here.
    log = SqliteEventLog(tmp_path / "events.db")
    await log.open()
    lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
    assert lease is not None
    (landed,) = await log.append([registered_event("before")], lease.epoch)

    def broken(max_events: int = 0) -> list[Any]:
        raise RuntimeError("broken batch")

    monkeypatch.setattr(log, "_take_batch", broken)
    pending = log.append([registered_event("queued")], lease.epoch)
    with pytest.raises(AppendError, match="broken batch"):
        await asyncio.wait_for(pending, 10)
    with pytest.raises(AppendError, match="open it again"):
        await log.append([registered_event("after")], lease.epoch)

    await asyncio.wait_for(log.close(), 10)
    async with SqliteEventLog(tmp_path / "events.db") as reopened:
        ids = registered_ids(await read_all(reopened))
    assert ids == ["before"]
    assert landed == 2


async def test_close_commits_waiting_appends(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    log = SqliteEventLog(path)
    await log.open()
    lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
    assert lease is not None
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        # An open write transaction of another connection keeps the group
        # commit waiting on SQLite's busy timeout while close() runs.
        blocker.execute("BEGIN IMMEDIATE")
        in_commit = [
            asyncio.ensure_future(
                log.append([registered_event(f"in-commit-{i}")], lease.epoch)
            )
            for i in range(10)
        ]
        await asyncio.sleep(0.3)
        queued = [
            asyncio.ensure_future(
                log.append([registered_event(f"queued-{i}")], lease.epoch)
            )
            for i in range(10)
        ]
        await asyncio.sleep(0.05)
        closing = asyncio.create_task(log.close())
        await asyncio.sleep(0.1)
        with pytest.raises(LogClosedError):
            await log.append([registered_event("after-close")], lease.epoch)
        blocker.execute("ROLLBACK")
        await asyncio.wait_for(closing, 30)

        done, pending = await asyncio.wait(in_commit + queued, timeout=5)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)} appends still wait after close()"
    finally:
        blocker.close()
        await log.close()

    for task in done:
        assert task.exception() is None
    async with SqliteEventLog(path) as reopened:
        stored = {
            event.seq: event.task_manager_registered.task_manager_id
            for event in await read_all(reopened)
        }
    for name, task in zip(
        [f"in-commit-{i}" for i in range(10)] + [f"queued-{i}" for i in range(10)],
        in_commit + queued,
        strict=True,
    ):
        (seq,) = task.result()
        assert stored[seq] == name
    assert "after-close" not in stored.values()


async def test_append_beyond_variable_limit_lands(tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(":memory:")) as probe:
        variable_limit = probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    # Each event takes two bound parameters of the insert statement.
    count = variable_limit // 2 + 1
    async with SqliteEventLog(tmp_path / "events.db") as log:
        lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
        assert lease is not None
        events = [registered_event(f"tm{i}") for i in range(count)]

        seqs = await log.append(events, lease.epoch)

        assert seqs == list(range(2, 2 + count))
        assert await log.last_seq() == 1 + count


async def test_reopen_keeps_events_and_lease(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    async with SqliteEventLog(path) as log:
        lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
        assert lease is not None
        await log.append([registered_event("x"), registered_event("y")], lease.epoch)
        written = await read_all(log)

    async with SqliteEventLog(path) as reopened:
        assert await read_all(reopened) == written
        leader = await reopened.leader()
        assert leader.holder == "a"
        assert leader.epoch == lease.epoch
        assert await reopened.append([registered_event("z")], lease.epoch) == [4]


# ---------------------------------------------------------------- reads


async def append_registered(log: EventLog, count: int) -> int:
    """Take the lease, append ``count`` events and return the lease's epoch.

    The lease's LeaderElected event is seq 1, so event ``tm<N>`` is seq N.
    """
    lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
    assert lease is not None
    await log.append(
        [registered_event(f"tm{i}") for i in range(2, count + 2)], lease.epoch
    )
    return lease.epoch


async def test_read_from_seq_returns_tail(log: EventLog) -> None:
    await append_registered(log, 9)

    events = await read_all(log, 4)

    assert [event.seq for event in events] == list(range(4, 11))
    assert registered_ids(events) == [f"tm{seq}" for seq in range(4, 11)]


async def test_read_from_every_seq(log: EventLog) -> None:
    await append_registered(log, 6)

    for from_seq in range(1, 9):
        events = await read_all(log, from_seq)
        assert [event.seq for event in events] == list(range(from_seq, 8))


async def test_read_empty_log_is_empty(log: EventLog) -> None:
    assert await read_all(log) == []
    assert await log.last_seq() == 0


async def test_read_across_pages(tmp_path: Path) -> None:
    async with SqliteEventLog(tmp_path / "events.db", page_size=3) as log:
        await append_registered(log, 11)

        for from_seq in (1, 2, 4, 12, 13):
            events = await read_all(log, from_seq)
            assert [event.seq for event in events] == list(range(from_seq, 13))


async def test_follow_yields_existing_then_new(log: EventLog) -> None:
    epoch = await append_registered(log, 3)
    seen: list[pb.Event] = []
    four_seen = asyncio.Event()
    six_seen = asyncio.Event()

    async def follow() -> None:
        async for event in log.follow(2):
            seen.append(event)
            if len(seen) == 3:
                four_seen.set()
            if len(seen) == 5:
                six_seen.set()

    follower = asyncio.create_task(follow())
    try:
        await asyncio.wait_for(four_seen.wait(), 10)
        await log.append([registered_event("new1"), registered_event("new2")], epoch)
        await asyncio.wait_for(six_seen.wait(), 10)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower

    assert [event.seq for event in seen] == [2, 3, 4, 5, 6]
    assert registered_ids(seen) == ["tm2", "tm3", "tm4", "new1", "new2"]


async def test_follow_compacted_seq_raises(log: EventLog) -> None:
    epoch = await append_registered(log, 5)
    await log.save_snapshot(pb.Snapshot(seq=4, epoch=epoch))
    await log.compact()

    with pytest.raises(CompactedError):
        await anext(aiter(log.follow(3)))


async def consume_then_compact(
    events: AsyncIterator[pb.Event], log: EventLog, epoch: int
) -> list[int]:
    """Take two events, let compaction delete the next ones, then drain."""
    seen = [(await anext(events)).seq, (await anext(events)).seq]
    await log.save_snapshot(pb.Snapshot(seq=8, epoch=epoch))
    assert await log.compact() == 8
    async with asyncio.timeout(5):
        async for event in events:
            seen.append(event.seq)
            if event.seq == 10:
                break
    return seen


async def test_read_overtaken_by_compaction_raises(logs: LogFactory) -> None:
    log = await logs.open(page_size=2)
    epoch = await append_registered(log, 9)

    # Compaction deletes seqs 3 to 8 before the read reaches them, and
    # skipping them silently would replay a state that never existed.
    with pytest.raises(CompactedError):
        await consume_then_compact(aiter(log.read(1)), log, epoch)


async def test_follow_overtaken_by_compaction_raises(logs: LogFactory) -> None:
    log = await logs.open(page_size=2)
    epoch = await append_registered(log, 9)

    with pytest.raises(CompactedError):
        await consume_then_compact(aiter(log.follow(1)), log, epoch)


# ---------------------------------------------------------------- snapshots


def apply_event(state: pb.CoordinatorState, event: pb.Event) -> None:
    """Fold one event into the state, a small stand-in for the coordinator's apply."""
    kind = event.WhichOneof("body")
    if kind == "leader_elected":
        state.epoch = event.leader_elected.epoch
        state.leader_id = event.leader_elected.leader_id
        state.leader_address = event.leader_elected.address
    elif kind == "task_manager_registered":
        body = event.task_manager_registered
        task_manager = state.task_managers[body.task_manager_id]
        task_manager.task_manager_id = body.task_manager_id
        task_manager.slots = body.slots
        task_manager.status = pb.TASK_MANAGER_ALIVE
        task_manager.lost_reason = ""
        task_manager.registered_ms = event.timestamp.ToMilliseconds()
    elif kind == "task_manager_lost":
        task_manager = state.task_managers[event.task_manager_lost.task_manager_id]
        task_manager.status = pb.TASK_MANAGER_LOST
        task_manager.lost_reason = event.task_manager_lost.reason
    state.applied_seq = event.seq


def replay(
    events: list[pb.Event], state: pb.CoordinatorState | None = None
) -> pb.CoordinatorState:
    result = pb.CoordinatorState()
    if state is not None:
        result.CopyFrom(state)
    for event in events:
        apply_event(result, event)
    return result


def churn(rng: random.Random, count: int) -> list[pb.Event]:
    """Build registrations and losses whose order changes the final state."""
    events = []
    for i in range(count):
        name = f"tm{rng.randrange(8)}"
        if rng.random() < 0.6:
            events.append(registered_event(name, slots=i + 1))
        else:
            events.append(lost_event(name, f"heartbeat timeout {i}"))
    return events


async def test_snapshot_round_trip(log: EventLog) -> None:
    epoch = await append_registered(log, 4)
    snapshot = pb.Snapshot(seq=3, epoch=epoch)
    snapshot.taken.FromMilliseconds(123_456)
    snapshot.state.leader_id = "a"
    snapshot.state.task_managers["tm1"].slots = 4
    snapshot.state.applied_seq = 3

    await log.save_snapshot(snapshot)

    assert await log.load_snapshot() == snapshot


async def test_load_snapshot_without_any(log: EventLog) -> None:
    assert await log.load_snapshot() is None


async def test_load_snapshot_returns_newest(log: EventLog) -> None:
    epoch = await append_registered(log, 5)
    await log.save_snapshot(pb.Snapshot(seq=4, epoch=epoch))
    await log.save_snapshot(pb.Snapshot(seq=2, epoch=epoch))

    loaded = await log.load_snapshot()

    assert loaded is not None
    assert loaded.seq == 4


async def test_snapshot_past_last_seq_raises(log: EventLog) -> None:
    epoch = await append_registered(log, 2)

    with pytest.raises(ValueError, match="past the newest"):
        await log.save_snapshot(pb.Snapshot(seq=4, epoch=epoch))

    assert await log.load_snapshot() is None


async def test_compact_keeps_tail(log: EventLog) -> None:
    epoch = await append_registered(log, 11)
    await log.save_snapshot(pb.Snapshot(seq=10, epoch=epoch))

    deleted = await log.compact(keep_tail=3)

    assert deleted == 7
    events = await read_all(log, 8)
    assert [event.seq for event in events] == [8, 9, 10, 11, 12]
    with pytest.raises(CompactedError) as raised:
        await read_all(log, 7)
    assert raised.value.from_seq == 7
    assert raised.value.compacted_through == 7
    with pytest.raises(CompactedError):
        await read_all(log, 1)
    assert await log.last_seq() == 12


async def test_compact_without_snapshot_deletes_nothing(log: EventLog) -> None:
    await append_registered(log, 3)

    assert await log.compact() == 0
    assert len(await read_all(log)) == 4


async def test_compact_tail_longer_than_log(log: EventLog) -> None:
    epoch = await append_registered(log, 3)
    await log.save_snapshot(pb.Snapshot(seq=3, epoch=epoch))

    assert await log.compact(keep_tail=10) == 0
    assert len(await read_all(log)) == 4


async def test_compact_negative_tail_raises(log: EventLog) -> None:
    epoch = await append_registered(log, 3)
    await log.save_snapshot(pb.Snapshot(seq=3, epoch=epoch))

    with pytest.raises(ValueError, match="keep_tail"):
        await log.compact(keep_tail=-1)

    assert len(await read_all(log)) == 4


async def test_compact_everything_keeps_seqs_growing(log: EventLog) -> None:
    epoch = await append_registered(log, 4)
    await log.save_snapshot(pb.Snapshot(seq=5, epoch=epoch))

    assert await log.compact() == 5
    assert await log.last_seq() == 5
    assert await read_all(log, 6) == []

    seqs = await log.append([registered_event("after")], epoch)

    assert seqs == [6]
    assert registered_ids(await read_all(log, 6)) == ["after"]
    lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
    assert lease is not None
    assert await log.last_seq() == 7


async def test_compact_everything_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    async with SqliteEventLog(path) as log:
        epoch = await append_registered(log, 4)
        await log.save_snapshot(pb.Snapshot(seq=5, epoch=epoch))
        assert await log.compact() == 5

    async with SqliteEventLog(path) as reopened:
        assert await reopened.last_seq() == 5
        with pytest.raises(CompactedError):
            await read_all(reopened, 5)
        assert await reopened.append([registered_event("after")], epoch) == [6]
        lease = await reopened.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
        assert lease is not None
        assert await reopened.last_seq() == 7


async def test_snapshot_replay_equals_full_replay(log: EventLog) -> None:
    rng = random.Random(11)
    lease = await log.acquire_lease("a", "127.0.0.1:1", LONG_LEASE_S)
    assert lease is not None
    await log.append(churn(rng, 30), lease.epoch)
    head = await read_all(log)
    snapshot = pb.Snapshot(seq=head[-1].seq, epoch=lease.epoch)
    snapshot.state.CopyFrom(replay(head))
    await log.save_snapshot(snapshot)
    for _ in range(3):
        await log.append(churn(rng, 7), lease.epoch)
    full = replay(await read_all(log))
    await log.compact(keep_tail=4)

    loaded = await log.load_snapshot()
    assert loaded is not None
    from_snapshot = replay(await read_all(log, loaded.seq + 1), loaded.state)

    assert from_snapshot == full
    assert from_snapshot.applied_seq == await log.last_seq()
    assert len(from_snapshot.task_managers) > 1


# ---------------------------------------------------------------- files


async def expect_open_error(path: Path) -> LogOpenError:
    log = SqliteEventLog(path)
    with pytest.raises(LogOpenError) as raised:
        await log.open()
    await log.close()
    assert str(path) in str(raised.value)
    return raised.value


async def create_log(path: Path) -> None:
    async with SqliteEventLog(path) as log:
        await append_registered(log, 2)


def set_meta(path: Path, key: str, value: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
        conn.commit()


async def test_open_in_missing_folder_names_the_folder(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "log.db"

    error = await expect_open_error(path)

    assert f"folder {tmp_path / 'missing'}" in str(error)
    assert not path.parent.exists()


async def test_open_random_bytes_raises(tmp_path: Path) -> None:
    path = tmp_path / "random.db"
    content = random.Random(3).randbytes(64 * 1024)
    path.write_bytes(content)

    await expect_open_error(path)

    assert path.read_bytes() == content


async def test_open_foreign_database_raises(tmp_path: Path) -> None:
    path = tmp_path / "accounts.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO accounts VALUES (1, 'ada')")
        conn.commit()

    error = await expect_open_error(path)

    assert "meta" in str(error)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT name FROM accounts").fetchall() == [("ada",)]


async def test_open_foreign_database_keeps_journal_mode(tmp_path: Path) -> None:
    path = tmp_path / "accounts.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT)")
        conn.commit()

    await expect_open_error(path)

    # WAL mode persists in the file: switching another application's
    # database to it changes that application's database.
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)


async def test_open_foreign_meta_table_raises(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE meta (name TEXT, data BLOB)")
        conn.commit()

    await expect_open_error(path)


async def test_open_newer_schema_version_raises(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    await create_log(path)
    set_meta(path, "schema_version", "99")

    error = await expect_open_error(path)

    assert "99" in str(error)


async def test_open_other_format_raises(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    await create_log(path)
    set_meta(path, "format", "some-other-log")

    error = await expect_open_error(path)

    assert "some-other-log" in str(error)


def overwrite_column(path: Path, seq: int, column: str, value: object) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"UPDATE events SET {column} = ? WHERE seq = ?", (value, seq))
        conn.commit()


async def test_read_corrupt_body_raises(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    await create_log(path)
    # A varint tag that never ends is not a valid protobuf message.
    overwrite_column(path, 2, "body", b"\xff" * 12)

    async with SqliteEventLog(path) as log:
        seen: list[int] = []
        with pytest.raises(EventDecodeError) as raised:
            async for event in log.read():
                seen.append(event.seq)

    # Replay must stop at the corrupt event: nothing after it is yielded.
    assert all(seq < 2 for seq in seen)
    assert raised.value.seq == 2
    assert raised.value.event_type == "task_manager_registered"
    assert "seq 2" in str(raised.value)
    assert "task_manager_registered" in str(raised.value)


async def test_read_mismatched_type_raises(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    await create_log(path)
    overwrite_column(path, 3, "type", "job_submitted")

    async with SqliteEventLog(path) as log:
        with pytest.raises(EventDecodeError) as raised:
            await read_all(log, 2)

    assert raised.value.seq == 3
    assert raised.value.event_type == "job_submitted"


async def test_load_corrupt_snapshot_raises(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    async with SqliteEventLog(path) as log:
        epoch = await append_registered(log, 2)
        await log.save_snapshot(pb.Snapshot(seq=2, epoch=epoch))
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE snapshots SET body = ?", (b"\xff" * 12,))
        conn.commit()

    async with SqliteEventLog(path) as log:
        with pytest.raises(EventDecodeError) as raised:
            await log.load_snapshot()

    assert raised.value.seq == 2


# ---------------------------------------------------------------- close


async def test_close_twice_is_safe(log: EventLog) -> None:
    await log.close()
    await log.close()


# The lease append_registered takes on a fresh log.
FIRST_LEASE = Lease("a", 1, 0)

CLOSED_OPERATIONS: dict[str, Callable[[EventLog], Coroutine[Any, Any, object]]] = {
    "open": lambda log: log.open(),
    "append": lambda log: log.append([registered_event("late")], 1),
    "read": lambda log: read_all(log),
    "follow": lambda log: anext(aiter(log.follow())),
    "last_seq": lambda log: log.last_seq(),
    "save_snapshot": lambda log: log.save_snapshot(pb.Snapshot(seq=1, epoch=1)),
    "load_snapshot": lambda log: log.load_snapshot(),
    "compact": lambda log: log.compact(),
    "acquire_lease": lambda log: log.acquire_lease("b", "127.0.0.1:2", 1.0),
    "renew_lease": lambda log: log.renew_lease(FIRST_LEASE, 1.0),
    "release_lease": lambda log: log.release_lease(FIRST_LEASE),
    "leader": lambda log: log.leader(),
}


@pytest.mark.parametrize("operation", sorted(CLOSED_OPERATIONS))
async def test_use_after_close_raises(log: EventLog, operation: str) -> None:
    epoch = await append_registered(log, 1)
    await log.save_snapshot(pb.Snapshot(seq=1, epoch=epoch))
    await log.close()

    with pytest.raises(LogClosedError):
        await CLOSED_OPERATIONS[operation](log)
