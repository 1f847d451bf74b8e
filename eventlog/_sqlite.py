"""The SQLite event log on aiosqlite: the embedded default.

The database runs in WAL mode with ``synchronous=FULL``, so a commit that
returned survives a crash of the process or the machine. Events are
written by one writer connection only, and reads go through a connection
of their own, so readers never wait behind a commit. Concurrent appends
are group-committed: a single writer task takes the appends that arrived
while the previous commits ran and writes them in one transaction, in
arrival order. When handing results to many callers costs the event loop
more than a commit costs the writer thread, it writes them as two batches
instead, so that one commits while the loop settles the callers of the
other.

When appends keep arriving one by one, as they do from the handlers of a
busy server, the writer delays a small commit, by up to 10 ms by default,
so that it takes more of them (a commit delay, like PostgreSQL's
``commit_delay`` or Kafka's ``linger.ms``). Each commit costs the process a
hand-off to the writer thread, the thread's wake-ups and an fsync, whatever
its size. The delay is used only while it pays: when a delay gathers almost
nothing, because every appender is already waiting for a commit, the writer
stops delaying for a growing number of commits.

SQLite's WAL mode needs a local file system, so several coordinators may
share one log only on one host.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from eventlog._base import (
    AppendError,
    CompactedError,
    EventDecodeError,
    EventLog,
    EventLogError,
    FencedError,
    LeaderInfo,
    Lease,
    LogClosedError,
    LogOpenError,
    StandbyInfo,
    event_type,
    now_ms,
)
from observability import instruments
from protos import jobledger_events_pb2 as pb

logger = logging.getLogger(__name__)

FORMAT_NAME = "jobledger-eventlog"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch INTEGER NOT NULL,
    type TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    seq INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    address TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
"""

# Standby positions: not part of the first schema, so it is created in logs
# written before it existed, too. Older releases ignore the extra table.
_STANDBYS_TABLE = """
CREATE TABLE IF NOT EXISTS standbys (
    coordinator_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    followed_seq INTEGER NOT NULL,
    reported_ms INTEGER NOT NULL
)
"""

_INSERT_ONE = "INSERT INTO events (epoch, type, body) VALUES (?, ?, ?) RETURNING seq"
_PAGE_QUERY = (
    "SELECT seq, epoch, type, body FROM events WHERE seq >= ? ORDER BY seq LIMIT ?"
)
_LAST_SEQ_QUERY = "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
_FENCE_QUERY = (
    "SELECT (SELECT epoch FROM lease WHERE id = 1),"
    " coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)"
)
_INSERT_EXPLICIT = "INSERT INTO events (seq, epoch, type, body) VALUES (?, ?, ?, ?)"
# Rows of one group-commit statement: two bound parameters each, far below
# SQLite's default limit of 32,766 parameters. Larger batches are written
# as a transaction of several statements.
_STATEMENT_ROWS = 4096
# Group commits handed to the writer thread at once.
_COMMITS_IN_FLIGHT = 2
# Minimum number of waiting appends that the writer splits into two batches.
# Below it, the fixed cost of a second commit outweighs what the overlap saves.
# NOTE: an estimate. Splits were measured at 256 appends (a gain) only.
_SPLIT_MIN_APPENDS = 64
# A commit delay ends early once this many appends wait: the batch is large
# enough that its commit costs each of them little.
_DELAY_FULL_APPENDS = 64
# A commit delay pays when it gathers at least this many more appends.
_DELAY_MIN_GAIN = 4
# After a delay that did not pay, the writer commits without delay this many
# times, doubling after every further such delay up to the maximum.
_DELAY_FIRST_SKIP = 16
_DELAY_MAX_SKIP = 4096
# The commit delay of a log that is not given one, in seconds.
DEFAULT_COMMIT_DELAY_S = 0.01


@functools.lru_cache(maxsize=64)
def _batch_insert_sql(rows: int) -> str:
    """Return the one statement that appends a batch of ``rows`` events.

    The statement is its own transaction. It inserts every row or none: the
    uncorrelated subqueries are evaluated once, and the batch lands only when
    the lease's epoch is the writer's and the log ends at the seq the writer
    expects, so a batch never lands after an earlier one failed. Each row's
    seq is that expected end plus its position in the batch.
    sqlite_sequence keeps the highest seq ever assigned, even after
    compaction empties the table, so seqs are never reused.

    Parameters: the expected end, the epoch, a (type, body) pair per row,
    the epoch again and the expected end again.
    """
    values = ",".join(f"({i},?,?)" for i in range(1, rows + 1))
    return (
        "INSERT INTO events (seq, epoch, type, body)"
        f" SELECT ? + column1, ?, column2, column3 FROM (VALUES {values})"
        " WHERE (SELECT epoch FROM lease WHERE id = 1) = ?"
        " AND coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0) = ?"
    )


# One caller's batch, waiting for the writer task: its epoch, its events as
# flat (type, body) pairs ready to bind to the insert statement, their
# number, and the caller's future. A tuple rather than a class, because one
# is made for every append, and a tuple costs the event loop a third of it.
_PendingAppend = tuple[int, list[object], int, "asyncio.Future[list[int]]"]


class SqliteEventLog(EventLog):
    """The event log in one SQLite file.

    Three connections share the file. The writer connection runs only the
    group-commit statements, each a transaction of its own. The control
    connection runs the lease, snapshot and compaction transactions, and the
    reader serves ``read`` and ``follow``, so readers never wait behind a
    commit.

    Args:
        path: the database file; created when missing.
        max_batch_events: the most events one group commit writes.
        commit_delay_s: the maximum time a small commit waits for more
            appends while appends keep arriving; 0 commits at once.
        poll_interval_s: how often ``follow`` looks for events written by
            other processes; events of this process wake it at once.
        page_size: events fetched per query while reading.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_batch_events: int = 4096,
        commit_delay_s: float = DEFAULT_COMMIT_DELAY_S,
        poll_interval_s: float = 0.02,
        page_size: int = 4096,
    ) -> None:
        if not 0 <= commit_delay_s < math.inf:
            raise ValueError(
                f"invalid commit delay {commit_delay_s} s: give a finite number "
                "of 0 or more seconds"
            )
        self.path = Path(path)
        self._max_batch_events = max_batch_events
        self._commit_delay_s = commit_delay_s
        # Commits left to start without a delay, and how many the next delay
        # that does not pay skips.
        self._delay_skip = 0
        self._delay_next_skip = _DELAY_FIRST_SKIP
        # Set while the writer delays a commit; a full queue wakes it early.
        self._delay_waiter: asyncio.Future[None] | None = None
        self._commits = 0
        # Set once the writer task failed; every later append fails with it.
        self._writer_error: AppendError | None = None
        self._poll_interval_s = poll_interval_s
        self._page_size = page_size
        self._writer: aiosqlite.Connection | None = None
        self._control: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._control_lock = asyncio.Lock()
        self._queue: deque[_PendingAppend] = deque()
        self._wakeup = asyncio.Event()
        self._committed = asyncio.Condition()
        self._writer_task: asyncio.Task[None] | None = None
        # The seq the log ends at once every commit handed to the writer
        # thread has landed; the next batch expects it.
        self._tail_seq = 0
        # When the last commit landed and how long the writer thread took
        # for it. Both decide whether the next batch is split in two.
        self._landed_at = 0.0
        self._commit_s = 0.0
        # Epochs with a failed commit: later batches of such an epoch were
        # decided on state that included the lost events, so none may land.
        # Taking the lease again starts a new epoch.
        self._poisoned_epochs: set[int] = set()
        self._closing = False
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._writer is not None:
            return
        self._check_not_closed()
        if not self.path.parent.is_dir():
            # Checked here: a failed aiosqlite connect can leave its thread
            # to report after the event loop has closed.
            raise LogOpenError(
                f"folder {self.path.parent} of log {self.path} does not exist; "
                "create it or give another path"
            )
        try:
            # The file is checked before anything changes it: WAL mode is
            # switched on only once it is known to be a jobledger log.
            self._control = await self._connect(wal=False)
            await self._init_schema(self._control)
            await self._use_wal(self._control)
            self._writer = await self._connect()
            self._reader = await self._connect()
        except sqlite3.DatabaseError as exc:
            await self._close_connections()
            raise LogOpenError(f"{self.path} is not a jobledger log: {exc}") from exc
        except LogOpenError:
            await self._close_connections()
            raise
        self._tail_seq = await self.last_seq()
        self._writer_task = asyncio.create_task(
            self._run_writer(), name=f"eventlog-writer {self.path}"
        )
        logger.info("event log opened: %s (last seq %d)", self.path, self._tail_seq)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._writer_task is not None:
            # Appends already handed over are committed first, within a bound;
            # new ones are rejected from here on. A running commit delay ends,
            # since no more appends can come.
            self._wakeup.set()
            if self._delay_waiter is not None:
                _settle(self._delay_waiter)
            try:
                await asyncio.wait_for(asyncio.shield(self._writer_task), 5.0)
            except TimeoutError:
                logger.warning("event log %s closed with appends unwritten", self.path)
            self._writer_task.cancel()
            # The writer catches every other failure itself.
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
        self._closed = True
        self._fail_pending(LogClosedError(f"event log {self.path} was closed"))
        await self._close_connections()
        logger.info("event log closed: %s", self.path)

    async def _connect(self, *, wal: bool = True) -> aiosqlite.Connection:
        # isolation_level=None: autocommit, so each group-commit statement is
        # its own transaction and others are begun explicitly.
        conn = await aiosqlite.connect(
            self.path, isolation_level=None, cached_statements=256
        )
        try:
            await conn.execute("PRAGMA busy_timeout = 10000")
            if wal:
                await self._use_wal(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    @staticmethod
    async def _use_wal(conn: aiosqlite.Connection) -> None:
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = FULL")

    async def _init_schema(self, conn: aiosqlite.Connection) -> None:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            tables = {
                row[0]
                for row in await _fetchall(
                    conn, "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            }
            if tables and "meta" not in tables:
                raise LogOpenError(
                    f"{self.path} is not a jobledger log: it is an SQLite database "
                    "without jobledger's meta table; give the path of a jobledger "
                    "log or of a new file"
                )
            if "meta" in tables:
                await self._check_meta(conn)
            else:
                await self._create_schema(conn)
            await conn.execute(_STANDBYS_TABLE)
            await conn.execute("COMMIT")
        except BaseException:
            await _rollback(conn)
            raise

    async def _create_schema(self, conn: aiosqlite.Connection) -> None:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                await conn.execute(statement)
        await conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [("format", FORMAT_NAME), ("schema_version", str(SCHEMA_VERSION))],
        )
        await conn.execute(
            "INSERT INTO lease (id, holder, address, epoch, expires_ms)"
            " VALUES (1, '', '', 0, 0)"
        )
        logger.info("event log created: %s", self.path)

    async def _check_meta(self, conn: aiosqlite.Connection) -> None:
        meta = dict(await _fetchall(conn, "SELECT key, value FROM meta"))
        if meta.get("format") != FORMAT_NAME:
            raise LogOpenError(
                f"{self.path} is not a jobledger log: its meta table names format "
                f"{meta.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        version = meta.get("schema_version")
        if version != str(SCHEMA_VERSION):
            raise LogOpenError(
                f"{self.path} has schema version {version}, but this jobledger "
                f"reads version {SCHEMA_VERSION} only; open it with the jobledger "
                "release that wrote it"
            )

    async def _close_connections(self) -> None:
        for conn in (self._reader, self._writer, self._control):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._reader = self._writer = self._control = None

    def _check_not_closed(self) -> None:
        if self._closed:
            raise LogClosedError(f"event log {self.path} is closed")

    def _conn(self, conn: aiosqlite.Connection | None) -> aiosqlite.Connection:
        self._check_not_closed()
        if conn is None:
            raise LogClosedError(f"event log {self.path} is not open; call open()")
        return conn

    @property
    def commits(self) -> int:
        """Group commits that landed since the log was made."""
        return self._commits

    # ------------------------------------------------------------ appends

    def append(
        self, events: Sequence[pb.Event], epoch: int
    ) -> asyncio.Future[list[int]]:
        # A plain method returning the caller's future, not a coroutine. At
        # high rates each append costs the event loop more than its share of
        # the commit does, and a coroutine per append added about a tenth to
        # the loop's time per append in a benchmark of 256 writers.
        # One test covers the open log, for the same reason.
        if self._writer is None or self._closing:
            self._conn(self._writer)
            raise LogClosedError(f"event log {self.path} is closing")
        # Made directly, because asyncio's create_future is Python code.
        future: asyncio.Future[list[int]] = asyncio.Future()
        if not events:
            future.set_result([])
            return future
        if epoch in self._poisoned_epochs:
            future.set_exception(_poisoned(epoch))
            return future
        if self._writer_error is not None:
            future.set_exception(self._writer_error)
            return future
        queue = self._queue
        queue.append((epoch, _encode(events), len(events), future))
        self._wakeup.set()
        waiter = self._delay_waiter
        if waiter is not None and len(queue) >= _DELAY_FULL_APPENDS:
            _settle(waiter)
        return future

    async def _run_writer(self) -> None:
        # Appends that arrive while commits run wait here and form the next
        # batch, so a commit's cost is shared by every caller of its batch.
        # Two commits may be in flight: the writer thread runs the second
        # while the event loop hands the results of the first to its callers.
        # Each statement lands only where the log ends at its expected seq,
        # so the second never lands after the first failed.
        in_flight: deque[asyncio.Task[bool]] = deque()
        waited = True
        try:
            while True:
                if not self._queue:
                    if in_flight:
                        await self._finish_oldest(in_flight)
                    elif self._closing:
                        return
                    else:
                        await self._wakeup.wait()
                        self._wakeup.clear()
                        waited = True
                    continue
                if not in_flight and not waited and self._worth_splitting():
                    await self._start_commit(in_flight, self._queued_events() // 2)
                waited = False
                if len(in_flight) >= _COMMITS_IN_FLIGHT:
                    await self._finish_oldest(in_flight)
                    continue
                _, _, head_count, _ = self._queue[0]
                if head_count > _STATEMENT_ROWS:
                    # A batch of several statements is one explicit
                    # transaction, which nothing else may interleave with.
                    while in_flight:
                        await self._finish_oldest(in_flight)
                    await self._start_commit(in_flight)
                    await self._finish_oldest(in_flight)
                    continue
                if (
                    self._commit_delay_s
                    and not self._closing
                    and len(self._queue) < _DELAY_FULL_APPENDS
                ):
                    await self._delay_commit()
                await self._start_commit(in_flight)
        except asyncio.CancelledError:
            for task in in_flight:
                task.cancel()
            raise
        except Exception as exc:
            # Any other failure (say, an sqlite3.Error from last_seq() after
            # a failed batch) ends the writer. The commits in flight settle
            # their own callers; every other append fails from here on.
            logger.exception("writer task of event log %s failed", self.path)
            self._writer_error = AppendError(
                f"the writer of event log {self.path} failed: {exc!r}; "
                "close the log and open it again"
            )
            self._fail_pending(self._writer_error)

    async def _delay_commit(self) -> None:
        """Wait up to the commit delay for more appends, while that pays.

        A delay pays when appends arrive independently of this log's
        commits, as RPCs do at a busy server. When every appender waits for
        a commit already, as a fixed set of callers appending in a loop
        does, nothing arrives during the delay. Such a delay is tried again
        only after a growing number of commits without one, so it costs
        those callers a fraction of a percent.
        """
        if self._delay_skip:
            self._delay_skip -= 1
            return
        queue = self._queue
        before = len(queue)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._delay_waiter = waiter
        timer = loop.call_later(self._commit_delay_s, _settle, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._delay_waiter = None
        if len(queue) - before >= _DELAY_MIN_GAIN:
            self._delay_next_skip = _DELAY_FIRST_SKIP
            return
        self._delay_skip = self._delay_next_skip
        self._delay_next_skip = min(2 * self._delay_next_skip, _DELAY_MAX_SKIP)

    def _worth_splitting(self) -> bool:
        """Return whether two half batches beat one batch of the queue.

        Called when no commit is in flight, right after the callers of the
        last one appended again. When settling those callers took the event
        loop longer than the writer thread took for their commit, the loop,
        not the thread, limits the rate: two halves, one committing while
        the loop settles the other, keep both busy. Otherwise one batch
        shares one commit among more callers.
        """
        if len(self._queue) < _SPLIT_MIN_APPENDS:
            return False
        settling_s = time.perf_counter() - self._landed_at
        return settling_s > self._commit_s

    def _queued_events(self) -> int:
        return sum(count for _, _, count, _ in self._queue)

    async def _start_commit(
        self, in_flight: deque[asyncio.Task[bool]], max_events: int = 0
    ) -> None:
        """Hand the next batch, of at most ``max_events`` events when that is
        not 0, to the writer thread behind the commits in flight."""
        batch = self._take_batch(max_events)
        count = sum(n for _, _, n, _ in batch)
        expected_tail = self._tail_seq
        self._tail_seq += count
        task = asyncio.create_task(
            self._commit(batch, expected_tail, time.perf_counter())
        )
        in_flight.append(task)
        # The task's first step queues its statement on the writer thread,
        # so statements reach the thread in the order their batches formed.
        await asyncio.sleep(0)

    async def _finish_oldest(self, in_flight: deque[asyncio.Task[bool]]) -> None:
        landed = await in_flight.popleft()
        if landed:
            return
        # Every later statement expected the failed batch to land, so each
        # fails too; the next batch starts where the log really ends.
        while in_flight:
            await in_flight.popleft()
        self._tail_seq = await self.last_seq()

    def _take_batch(self, max_events: int = 0) -> list[_PendingAppend]:
        # A batch never mixes two epochs: each is fenced by its own.
        first = self._queue.popleft()
        batch = [first]
        epoch, _, count, _ = first
        limit = min(self._max_batch_events, _STATEMENT_ROWS)
        if max_events:
            limit = min(limit, max_events)
        while self._queue:
            head_epoch, _, head_count, _ = self._queue[0]
            if head_epoch != epoch:
                break
            if count + head_count > limit:
                break
            batch.append(self._queue.popleft())
            count += head_count
        return batch

    async def _commit(
        self, batch: list[_PendingAppend], expected_tail: int, started: float
    ) -> bool:
        """Write one batch and settle its callers; return whether it landed.

        ``started`` is when the batch was handed to the writer thread.
        """
        epoch = batch[0][0]
        count = sum(n for _, _, n, _ in batch)
        try:
            if epoch in self._poisoned_epochs:
                raise _poisoned(epoch)
            if count <= _STATEMENT_ROWS:
                landed = await self._insert_statement(batch, epoch, expected_tail)
            else:
                landed = await self._insert_transaction(batch, epoch, expected_tail)
            if not landed:
                raise await self._rejection(epoch, expected_tail)
        except asyncio.CancelledError:
            # Only close() cancels a commit, once its bound has passed.
            _fail_all(
                batch,
                LogClosedError(
                    f"event log {self.path} was closed before a commit of {count} "
                    "events finished; they may or may not be in the log"
                ),
            )
            raise
        except Exception as exc:
            # Any failure leaves the commit's outcome unknown, so its epoch
            # is poisoned and its callers fail, whatever raised.
            self._fail_commit(batch, epoch, exc)
            return False
        landed_at = time.perf_counter()
        # The thread began this commit when the one before it landed.
        self._commit_s = landed_at - max(started, self._landed_at)
        self._landed_at = landed_at
        instruments.log_commit_events.record(count)
        self._commits += 1
        seq = expected_tail + 1
        for _, _, n, future in batch:
            if not future.done():
                future.set_result([seq] if n == 1 else list(range(seq, seq + n)))
            seq += n
        async with self._committed:
            self._committed.notify_all()
        return True

    async def _insert_statement(
        self, batch: list[_PendingAppend], epoch: int, expected_tail: int
    ) -> bool:
        params: list[object] = [expected_tail, epoch]
        for _, pairs, _, _ in batch:
            params.extend(pairs)
        params.append(epoch)
        params.append(expected_tail)
        count = (len(params) - 4) // 2
        conn = self._conn(self._writer)
        cursor = await conn.execute(_batch_insert_sql(count), params)
        return bool(cursor.rowcount == count)

    async def _insert_transaction(
        self, batch: list[_PendingAppend], epoch: int, expected_tail: int
    ) -> bool:
        """Write a batch too large for one statement's parameters.

        Only the writer task uses the writer connection, one commit at a
        time, so the transaction's statements cannot interleave with others.
        """
        conn = self._conn(self._writer)
        rows: list[tuple[object, ...]] = []
        seq = expected_tail
        for _, pairs, _, _ in batch:
            for i in range(0, len(pairs), 2):
                seq += 1
                rows.append((seq, epoch, pairs[i], pairs[i + 1]))
        await conn.execute("BEGIN IMMEDIATE")
        try:
            ((log_epoch, last_seq),) = await _fetchall(conn, _FENCE_QUERY)
            if log_epoch != epoch or last_seq != expected_tail:
                await _rollback(conn)
                return False
            await conn.executemany(_INSERT_EXPLICIT, rows)
            await conn.execute("COMMIT")
        except BaseException:
            await _rollback(conn)
            raise
        return True

    async def _rejection(self, epoch: int, expected_tail: int) -> EventLogError:
        """Explain why a fenced batch statement inserted nothing."""
        log_epoch = (await self.leader()).epoch
        if log_epoch != epoch:
            return FencedError(epoch, log_epoch)
        last = await self.last_seq()
        return AppendError(
            f"log {self.path} ends at seq {last}, not at the expected seq "
            f"{expected_tail}: an earlier batch of epoch {epoch} did not land"
        )

    def _fail_commit(
        self, batch: list[_PendingAppend], epoch: int, exc: Exception
    ) -> None:
        if not isinstance(exc, FencedError):
            # A fenced epoch needs no mark: the log rejects it by itself.
            self._poisoned_epochs.add(epoch)
        if isinstance(exc, FencedError):
            logger.warning("%s (%d appends rejected)", exc, len(batch))
            error: Exception = exc
        elif isinstance(exc, EventLogError):
            logger.error("append of epoch %d failed: %s", epoch, exc)
            error = exc
        else:
            logger.error("commit to %s failed at epoch %d: %s", self.path, epoch, exc)
            error = AppendError(f"commit to {self.path} failed: {exc}")
        _fail_all(batch, error)

    def _fail_pending(self, error: Exception) -> None:
        while self._queue:
            _fail_all([self._queue.popleft()], error)

    # ------------------------------------------------------------ reads

    async def read(self, from_seq: int = 1) -> AsyncIterator[pb.Event]:
        next_seq = await self._check_compacted(from_seq)
        while True:
            page = await self._fetch_page(next_seq)
            for event in page:
                yield event
            if len(page) < self._page_size:
                return
            next_seq = page[-1].seq + 1

    async def follow(self, from_seq: int = 1) -> AsyncIterator[pb.Event]:
        next_seq = await self._check_compacted(from_seq)
        while True:
            page = await self._fetch_page(next_seq)
            for event in page:
                yield event
            if page:
                next_seq = page[-1].seq + 1
                if len(page) == self._page_size:
                    continue
            async with self._committed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._committed.wait(), self._poll_interval_s
                    )

    async def _fetch_page(self, from_seq: int) -> list[pb.Event]:
        """Fetch the events from ``from_seq`` on; raise CompactedError when
        compaction deleted ``from_seq`` meanwhile (seqs have no gaps)."""
        rows = await _fetchall(
            self._conn(self._reader), _PAGE_QUERY, (from_seq, self._page_size)
        )
        if rows and rows[0][0] != from_seq:
            raise CompactedError(from_seq, await self._compacted_through())
        return [
            _decode(seq, epoch, type_name, body) for seq, epoch, type_name, body in rows
        ]

    async def _check_compacted(self, from_seq: int) -> int:
        compacted = await self._compacted_through()
        if from_seq <= compacted:
            raise CompactedError(from_seq, compacted)
        return max(from_seq, 1)

    async def _compacted_through(self) -> int:
        rows = await _fetchall(
            self._conn(self._reader),
            "SELECT value FROM meta WHERE key = 'compacted_through'",
        )
        return int(rows[0][0]) if rows else 0

    async def last_seq(self) -> int:
        rows = await _fetchall(self._conn(self._reader), _LAST_SEQ_QUERY)
        return int(rows[0][0]) if rows else 0

    # ------------------------------------------------------------ snapshots

    async def save_snapshot(self, snapshot: pb.Snapshot) -> None:
        last = await self.last_seq()
        if snapshot.seq > last:
            raise ValueError(
                f"snapshot seq {snapshot.seq} is past the newest event seq {last}"
            )
        body = snapshot.SerializeToString()
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT OR REPLACE INTO snapshots (seq, epoch, body) VALUES (?, ?, ?)",
                (snapshot.seq, snapshot.epoch, body),
            )
        logger.info(
            "snapshot saved at seq %d (%d bytes) in %s",
            snapshot.seq,
            len(body),
            self.path,
        )

    async def load_snapshot(self) -> pb.Snapshot | None:
        rows = await _fetchall(
            self._conn(self._reader),
            "SELECT seq, body FROM snapshots ORDER BY seq DESC LIMIT 1",
        )
        if not rows:
            return None
        seq, body = rows[0]
        try:
            return pb.Snapshot.FromString(body)
        except Exception as exc:
            raise EventDecodeError(seq, "snapshot", str(exc)) from exc

    async def compact(self, keep_tail: int = 0) -> int:
        if keep_tail < 0:
            raise ValueError(f"keep_tail must be 0 or more, got {keep_tail}")
        async with self._transaction() as conn:
            rows = await _fetchall(conn, "SELECT max(seq) FROM snapshots")
            snapshot_seq = rows[0][0]
            if snapshot_seq is None:
                return 0
            through = snapshot_seq - keep_tail
            cursor = await conn.execute("DELETE FROM events WHERE seq <= ?", (through,))
            deleted = cursor.rowcount
            await conn.execute("DELETE FROM snapshots WHERE seq < ?", (snapshot_seq,))
            if through > 0:
                await conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('compacted_through', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value ="
                    " max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                    (str(through),),
                )
        logger.info(
            "compacted %d events through seq %d (snapshot at seq %d) in %s",
            deleted,
            through,
            snapshot_seq,
            self.path,
        )
        return int(deleted)

    # ------------------------------------------------------------ lease

    async def acquire_lease(
        self, holder: str, address: str, duration_s: float
    ) -> Lease | None:
        if not holder:
            raise ValueError("lease holder must not be empty")
        now = now_ms()
        async with self._transaction() as conn:
            ((current, epoch, expires),) = await _fetchall(
                conn, "SELECT holder, epoch, expires_ms FROM lease WHERE id = 1"
            )
            if current and current != holder and expires > now:
                return None
            new_epoch = epoch + 1
            lease = Lease(holder, new_epoch, now + int(duration_s * 1000))
            await conn.execute(
                "UPDATE lease SET holder = ?, address = ?, epoch = ?, expires_ms = ?"
                " WHERE id = 1",
                (holder, address, new_epoch, lease.expires_ms),
            )
            elected = pb.Event()
            elected.leader_elected.leader_id = holder
            elected.leader_elected.address = address
            elected.leader_elected.epoch = new_epoch
            elected.timestamp.FromMilliseconds(now)
            ((seq,),) = await _fetchall(
                conn, _INSERT_ONE, [new_epoch, *_encode([elected])]
            )
        self._tail_seq = seq
        logger.info(
            "lease acquired by %s at epoch %d in %s", holder, new_epoch, self.path
        )
        return lease

    async def renew_lease(self, lease: Lease, duration_s: float) -> Lease | None:
        expires = now_ms() + int(duration_s * 1000)
        async with self._transaction() as conn:
            cursor = await conn.execute(
                "UPDATE lease SET expires_ms = ?"
                " WHERE id = 1 AND holder = ? AND epoch = ?",
                (expires, lease.holder, lease.epoch),
            )
            renewed = cursor.rowcount == 1
        if not renewed:
            logger.warning(
                "lease of %s at epoch %d was taken over in %s",
                lease.holder,
                lease.epoch,
                self.path,
            )
            return None
        return dataclasses.replace(lease, expires_ms=expires)

    async def release_lease(self, lease: Lease) -> None:
        async with self._transaction() as conn:
            cursor = await conn.execute(
                "UPDATE lease SET holder = '', expires_ms = 0"
                " WHERE id = 1 AND holder = ? AND epoch = ?",
                (lease.holder, lease.epoch),
            )
            released = cursor.rowcount == 1
        if released:
            logger.info(
                "lease released by %s at epoch %d in %s",
                lease.holder,
                lease.epoch,
                self.path,
            )

    async def leader(self) -> LeaderInfo:
        rows = await _fetchall(
            self._conn(self._reader),
            "SELECT holder, address, epoch, expires_ms FROM lease WHERE id = 1",
        )
        holder, address, epoch, expires = rows[0]
        return LeaderInfo(holder, address, epoch, expires)

    async def report_standby(
        self, coordinator_id: str, address: str, followed_seq: int
    ) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO standbys (coordinator_id, address, followed_seq,"
                " reported_ms) VALUES (?, ?, ?, ?) ON CONFLICT (coordinator_id)"
                " DO UPDATE SET address = excluded.address,"
                " followed_seq = excluded.followed_seq,"
                " reported_ms = excluded.reported_ms",
                (coordinator_id, address, followed_seq, now_ms()),
            )

    async def forget_standby(self, coordinator_id: str) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "DELETE FROM standbys WHERE coordinator_id = ?", (coordinator_id,)
            )

    async def standbys(self) -> list[StandbyInfo]:
        rows = await _fetchall(
            self._conn(self._reader),
            "SELECT coordinator_id, address, followed_seq, reported_ms"
            " FROM standbys ORDER BY coordinator_id",
        )
        return [StandbyInfo(*row) for row in rows]

    # ------------------------------------------------------------ helpers

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """Run one write transaction on the control connection, exclusively."""
        async with self._control_lock:
            conn = self._conn(self._control)
            try:
                # BEGIN is inside the try, so a caller cancelled while it runs
                # does not leave the connection inside a transaction.
                await conn.execute("BEGIN IMMEDIATE")
                yield conn
            except BaseException:
                await _rollback(conn)
                raise
            await conn.execute("COMMIT")


def _encode(events: Sequence[pb.Event]) -> list[object]:
    """Serialize envelopes for storage as a flat list of (type, body) pairs.

    The seq and epoch columns are authoritative: whatever the envelope says
    of them is overwritten when it is read back. An envelope without a
    timestamp gets the current time, appended as an encoded field, which
    protobuf parses as if it had been set, so the caller's message is not
    copied or changed.
    """
    params: list[object] = []
    for event in events:
        type_name = event.WhichOneof("body")
        if type_name is None:
            event_type(event)
        body = event.SerializeToString()
        if not event.HasField("timestamp"):
            body += _timestamp_field(now_ms())
        params.append(type_name)
        params.append(body)
    return params


@functools.lru_cache(maxsize=4)
def _timestamp_field(millis: int) -> bytes:
    holder = pb.Event()
    holder.timestamp.FromMilliseconds(millis)
    return holder.SerializeToString()


def _decode(seq: int, epoch: int, type_name: str, body: bytes) -> pb.Event:
    try:
        event = pb.Event.FromString(body)
    except Exception as exc:
        raise EventDecodeError(seq, type_name, str(exc)) from exc
    decoded_type = event.WhichOneof("body")
    if decoded_type != type_name:
        raise EventDecodeError(
            seq,
            type_name,
            f"its body decodes as {decoded_type!r}; the log may have been written "
            "by a newer jobledger",
        )
    event.seq = seq
    event.epoch = epoch
    return event


async def _fetchall(
    conn: aiosqlite.Connection, sql: str, params: Sequence[object] = ()
) -> list[Any]:
    return list(await conn.execute_fetchall(sql, params))


def _poisoned(epoch: int) -> AppendError:
    return AppendError(
        f"an earlier append of epoch {epoch} failed, so no later one of that "
        "epoch may land; take the lease again to write at a new epoch"
    )


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _fail_all(batch: Iterable[_PendingAppend], error: Exception) -> None:
    for _, _, _, future in batch:
        if not future.done():
            future.set_exception(error)


async def _rollback(conn: aiosqlite.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        await conn.execute("ROLLBACK")
