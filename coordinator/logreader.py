"""Read-only access to a SQLite event log, for the inspection commands.

The database file is opened in SQLite's read-only mode: no lease is taken
and no row is written, so the commands are safe to run against the log of a
live coordinator. Like any WAL reader, the connection may create the
``-wal`` and ``-shm`` files beside the log when they are missing, and
records its read position in ``-shm``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from coordinator.errors import ReplayError
from coordinator.state import apply, new_state

# The format constants belong to the log's writer; reading them from there
# keeps this reader in step with the schema it writes.
from eventlog._sqlite import FORMAT_NAME, SCHEMA_VERSION
from protos import jobledger_events_pb2 as pb

_PAGE_SIZE = 1024
_PAGE_QUERY = (
    "SELECT seq, epoch, type, body FROM events WHERE seq >= ? ORDER BY seq LIMIT ?"
)


class LogFileError(Exception):
    """A log file that cannot be read; the message is one line with the fix."""


class LogFile:
    """A jobledger SQLite log opened read-only.

    Use as a context manager. Raises LogFileError from the constructor when
    the file is missing or is not a jobledger log of this schema version.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise LogFileError(
                f"log file {self.path} not found; give the --db path the "
                "coordinator was started with"
            )
        uri = self.path.absolute().as_uri() + "?mode=ro"
        try:
            self._conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise LogFileError(f"cannot open log file {self.path}: {exc}") from None
        try:
            self._conn.execute("PRAGMA busy_timeout = 10000")
            self._check_format()
        except BaseException:
            self._conn.close()
            raise

    def __enter__(self) -> LogFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection. Safe to call twice."""
        self._conn.close()

    def _check_format(self) -> None:
        try:
            rows = self._conn.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.DatabaseError as exc:
            raise LogFileError(
                f"{self.path} is not a jobledger log ({exc}); give the --db path "
                "the coordinator was started with"
            ) from None
        meta = dict(rows)
        if meta.get("format") != FORMAT_NAME:
            raise LogFileError(
                f"{self.path} is not a jobledger log: its format is "
                f"{meta.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise LogFileError(
                f"{self.path} has schema version {meta.get('schema_version')}, but "
                f"this jobledger reads version {SCHEMA_VERSION}; use the jobledger "
                "release that wrote it"
            )

    @contextlib.contextmanager
    def consistent_read(self) -> Iterator[None]:
        """Run the reads inside the block on one snapshot of the database.

        The coordinator may save a snapshot and compact meanwhile; one read
        transaction keeps the snapshot and the events after it consistent.
        """
        self._conn.execute("BEGIN")
        try:
            yield
        finally:
            self._conn.execute("ROLLBACK")

    def last_seq(self) -> int:
        """Return the seq of the newest event, or 0 for an empty log."""
        row = self._conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
        ).fetchone()
        return int(row[0]) if row else 0

    def compacted_through(self) -> int:
        """Return the last seq deleted by compaction, or 0."""
        row = self._conn.execute(
            "SELECT value FROM meta WHERE key = 'compacted_through'"
        ).fetchone()
        return int(row[0]) if row else 0

    def load_snapshot(self) -> pb.Snapshot | None:
        """Return the newest snapshot, or None when the log has none."""
        row = self._conn.execute(
            "SELECT seq, body FROM snapshots ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        try:
            return pb.Snapshot.FromString(row[1])
        except Exception as exc:
            raise LogFileError(
                f"{self.path}: the snapshot at seq {row[0]} cannot be decoded "
                f"({exc}); it may have been written by a newer jobledger"
            ) from None

    def read(self, from_seq: int = 1) -> Iterator[pb.Event]:
        """Yield the events with ``seq >= from_seq`` in order, then stop.

        Raises LogFileError when compaction deleted the event at ``from_seq``
        or an event cannot be decoded.
        """
        next_seq = self._first_seq(from_seq)
        while True:
            page = self._fetch_page(next_seq)
            yield from page
            if len(page) < _PAGE_SIZE:
                return
            next_seq = page[-1].seq + 1

    def follow(self, from_seq: int = 1, poll_s: float = 0.2) -> Iterator[pb.Event]:
        """Yield events like ``read``, then each new one as it commits.

        Polls every ``poll_s`` seconds and never ends by itself; the caller
        stops iterating (for example on Ctrl-C).
        """
        next_seq = self._first_seq(from_seq)
        while True:
            page = self._fetch_page(next_seq)
            yield from page
            if page:
                next_seq = page[-1].seq + 1
            if len(page) < _PAGE_SIZE:
                time.sleep(poll_s)

    def _first_seq(self, from_seq: int) -> int:
        compacted = self.compacted_through()
        if from_seq <= compacted:
            raise LogFileError(
                f"{self.path}: events up to seq {compacted} were compacted away; "
                f"use --from {compacted + 1} or later, or `jobledger replay` for the "
                "state they led to"
            )
        return max(from_seq, 1)

    def _fetch_page(self, from_seq: int) -> list[pb.Event]:
        rows = self._conn.execute(_PAGE_QUERY, (from_seq, _PAGE_SIZE)).fetchall()
        if rows and rows[0][0] != from_seq:
            # Seqs have no gaps, so a missing first one was compacted meanwhile.
            self._first_seq(from_seq)
            raise LogFileError(
                f"{self.path}: event seq {from_seq} is missing, the next is seq "
                f"{rows[0][0]}; the log is damaged, so restore it from a backup"
            )
        return [self._decode(*row) for row in rows]

    def _decode(self, seq: int, epoch: int, type_name: str, body: bytes) -> pb.Event:
        try:
            event = pb.Event.FromString(body)
        except Exception as exc:
            raise LogFileError(
                f"{self.path}: event seq {seq} of type {type_name!r} cannot be "
                f"decoded ({exc}); it may have been written by a newer jobledger"
            ) from None
        if event.WhichOneof("body") != type_name:
            raise LogFileError(
                f"{self.path}: event seq {seq} is stored as {type_name!r} but decodes "
                f"as {event.WhichOneof('body')!r}; it may have been written by a "
                "newer jobledger"
            )
        event.seq = seq
        event.epoch = epoch
        return event


def rebuild_state(log: LogFile) -> tuple[pb.CoordinatorState, int, int]:
    """Rebuild the coordinator's state from the newest snapshot and the events
    after it, as a coordinator does at start-up.

    Returns the state, the snapshot's seq (0 without one) and the number of
    events applied. Raises LogFileError naming the seq and type of an event
    that cannot be decoded or applied; a partial state is never returned.
    """
    state = new_state()
    with log.consistent_read():
        snapshot = log.load_snapshot()
        snapshot_seq = 0
        if snapshot is not None:
            state.CopyFrom(snapshot.state)
            snapshot_seq = snapshot.seq
        applied = 0
        try:
            for event in log.read(state.applied_seq + 1):
                apply(state, event)
                applied += 1
        except ReplayError as exc:
            raise LogFileError(f"{log.path}: replay stopped: {exc}") from None
    return state, snapshot_seq, applied
