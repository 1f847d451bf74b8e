"""The coordinator's settings, with Flink's defaults where Flink has one."""

from __future__ import annotations

import dataclasses

from eventlog import DEFAULT_COMMIT_DELAY_S


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointConfig:
    """Flink's checkpointing knobs, applied to every job."""

    # Seconds between periodic checkpoints; None turns periodic ones off.
    interval_s: float | None = None
    timeout_s: float = 600.0
    min_pause_s: float = 0.0
    max_concurrent: int = 1
    tolerable_failed: int = 0
    retained: int = 1


@dataclasses.dataclass(frozen=True, slots=True)
class ExponentialDelayRestart:
    """Flink's exponential-delay restart strategy and its defaults."""

    initial_s: float = 1.0
    max_s: float = 300.0
    multiplier: float = 2.0
    jitter: float = 0.1
    # A failure this long after the previous one starts again at initial_s.
    reset_after_s: float = 3600.0


@dataclasses.dataclass(frozen=True, slots=True)
class FixedDelayRestart:
    """Flink's fixed-delay restart strategy: a number of attempts, then fail."""

    attempts: int = 3
    delay_s: float = 1.0


RestartStrategy = ExponentialDelayRestart | FixedDelayRestart


@dataclasses.dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """Everything a coordinator process is started with."""

    db_path: str
    listen: str = "127.0.0.1:6123"
    # Advertised to standbys and clients as this coordinator's address;
    # defaults to the listen address.
    advertise: str | None = None
    coordinator_id: str | None = None
    checkpoints: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    heartbeat_interval_s: float = 10.0
    heartbeat_timeout_s: float = 50.0
    default_slots: int = 1
    max_parallelism: int = 128
    restart: RestartStrategy = dataclasses.field(
        default_factory=ExponentialDelayRestart
    )
    lease_s: float = 2.0
    # The maximum time the SQLite log delays a small commit for more appends.
    commit_delay_s: float = DEFAULT_COMMIT_DELAY_S
    # A snapshot is taken after this many events; 0 turns snapshots off.
    snapshot_every: int = 10_000
    # Events a compaction keeps behind the newest snapshot, for inspection.
    retain_events: int = 10_000
    # Seconds DeployTask and other worker calls keep being retried.
    worker_call_timeout_s: float = 10.0
    # How often timers (checkpoints, expiry, heartbeats, restarts) are checked.
    tick_s: float = 0.05
