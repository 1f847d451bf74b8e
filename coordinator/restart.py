"""Restart strategies: how long a failed job waits before it is redeployed."""

from __future__ import annotations

import random

from coordinator.config import (
    ExponentialDelayRestart,
    FixedDelayRestart,
    RestartStrategy,
)
from protos import jobledger_events_pb2 as pb


def next_restart_delay_ms(
    strategy: RestartStrategy,
    job: pb.JobState,
    now_ms: int,
    rng: random.Random,
) -> tuple[int, int] | None:
    """Return (jittered delay, base delay) in ms, or None when the job must fail.

    The base delay is what the next failure grows from; it is recorded in the
    failover event, so replay does not depend on the random draw.
    """
    if isinstance(strategy, FixedDelayRestart):
        if job.failover_attempts >= strategy.attempts:
            return None
        delay = int(strategy.delay_s * 1000)
        return delay, delay
    return _exponential(strategy, job, now_ms, rng)


def _exponential(
    strategy: ExponentialDelayRestart,
    job: pb.JobState,
    now_ms: int,
    rng: random.Random,
) -> tuple[int, int]:
    initial = int(strategy.initial_s * 1000)
    maximum = int(strategy.max_s * 1000)
    quiet_ms = now_ms - job.last_failure_ms
    if job.last_restart_delay_ms == 0 or quiet_ms >= strategy.reset_after_s * 1000:
        base = initial
    else:
        base = min(int(job.last_restart_delay_ms * strategy.multiplier), maximum)
    spread = base * strategy.jitter
    jittered = int(base + rng.uniform(-spread, spread))
    return max(0, min(jittered, maximum)), base
