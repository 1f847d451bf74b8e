"""The durable, fenced, append-only event log and its snapshot store."""

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
from eventlog._memory import MemoryEventLog
from eventlog._sqlite import DEFAULT_COMMIT_DELAY_S, SqliteEventLog

__all__ = [
    "DEFAULT_COMMIT_DELAY_S",
    "AppendError",
    "CompactedError",
    "EventDecodeError",
    "EventLog",
    "EventLogError",
    "FencedError",
    "LeaderInfo",
    "Lease",
    "LogClosedError",
    "LogOpenError",
    "MemoryEventLog",
    "SqliteEventLog",
    "StandbyInfo",
    "event_type",
    "now_ms",
]
