"""Unit tests of the restart strategies in ``coordinator.restart``."""

from __future__ import annotations

import random

import pytest

from coordinator.config import ExponentialDelayRestart, FixedDelayRestart
from coordinator.restart import next_restart_delay_ms
from protos import jobledger_events_pb2 as pb

NOW_MS = 10_000_000
EXPONENTIAL = ExponentialDelayRestart(
    initial_s=1.0, max_s=60.0, multiplier=2.0, jitter=0.1, reset_after_s=3600.0
)
NO_JITTER = ExponentialDelayRestart(
    initial_s=1.0, max_s=60.0, multiplier=2.0, jitter=0.0, reset_after_s=3600.0
)


def failed_before(last_delay_ms: int, quiet_ms: int = 1000) -> pb.JobState:
    """Return a job whose last failover backed off ``last_delay_ms``, and
    whose last failure was ``quiet_ms`` before NOW_MS."""
    return pb.JobState(
        job_id="job-1",
        last_restart_delay_ms=last_delay_ms,
        last_failure_ms=NOW_MS - quiet_ms if last_delay_ms else 0,
    )


def delay(
    strategy: ExponentialDelayRestart | FixedDelayRestart,
    job: pb.JobState,
    seed: int = 0,
) -> tuple[int, int] | None:
    return next_restart_delay_ms(strategy, job, NOW_MS, random.Random(seed))


# ------------------------------------------------------------------ exponential delay


def test_exponential_first_failure_initial() -> None:
    result = delay(NO_JITTER, pb.JobState(job_id="job-1"))
    assert result == (1000, 1000)


def test_exponential_grows_by_multiplier() -> None:
    bases = []
    job = pb.JobState(job_id="job-1")
    for _ in range(5):
        result = delay(NO_JITTER, job)
        assert result is not None
        jittered, base = result
        assert jittered == base
        bases.append(base)
        job = failed_before(base)
    assert bases == [1000, 2000, 4000, 8000, 16000]


def test_exponential_other_multiplier() -> None:
    strategy = ExponentialDelayRestart(initial_s=0.5, multiplier=3.0, jitter=0.0)
    assert delay(strategy, failed_before(500)) == (1500, 1500)
    assert delay(strategy, failed_before(1500)) == (4500, 4500)


def test_exponential_capped_at_max() -> None:
    assert delay(NO_JITTER, failed_before(32_000)) == (60_000, 60_000)
    assert delay(NO_JITTER, failed_before(60_000)) == (60_000, 60_000)


def test_exponential_jitter_capped_at_max() -> None:
    for seed in range(200):
        result = delay(EXPONENTIAL, failed_before(60_000), seed)
        assert result is not None
        jittered, base = result
        assert base == 60_000
        assert 54_000 <= jittered <= 60_000, seed


def test_exponential_jitter_within_ten_percent() -> None:
    draws = []
    for seed in range(500):
        result = delay(EXPONENTIAL, failed_before(4000), seed)
        assert result is not None
        jittered, base = result
        assert base == 8000
        assert 7200 <= jittered <= 8800, seed
        draws.append(jittered)
    assert min(draws) < 7600
    assert max(draws) > 8400


def test_exponential_jitter_does_not_compound() -> None:
    first = delay(EXPONENTIAL, pb.JobState(job_id="job-1"), seed=3)
    assert first is not None
    _, base = first
    assert base == 1000
    second = delay(EXPONENTIAL, failed_before(base), seed=4)
    assert second is not None
    assert second[1] == 2000


def test_exponential_resets_after_quiet_period() -> None:
    quiet_ms = int(NO_JITTER.reset_after_s * 1000)
    assert delay(NO_JITTER, failed_before(16_000, quiet_ms)) == (1000, 1000)
    assert delay(NO_JITTER, failed_before(16_000, quiet_ms + 1)) == (1000, 1000)


def test_exponential_grows_just_before_reset() -> None:
    quiet_ms = int(NO_JITTER.reset_after_s * 1000) - 1
    assert delay(NO_JITTER, failed_before(16_000, quiet_ms)) == (32_000, 32_000)


def test_exponential_same_seed_same_delay() -> None:
    job = failed_before(2000)
    assert delay(EXPONENTIAL, job, seed=11) == delay(EXPONENTIAL, job, seed=11)


def test_exponential_never_negative() -> None:
    strategy = ExponentialDelayRestart(initial_s=0.001, jitter=1.0)
    for seed in range(100):
        result = delay(strategy, pb.JobState(job_id="job-1"), seed)
        assert result is not None
        assert result[0] >= 0


# ------------------------------------------------------------------ fixed delay


@pytest.mark.parametrize("attempts_so_far", [0, 1, 2])
def test_fixed_delay_within_attempts(attempts_so_far: int) -> None:
    strategy = FixedDelayRestart(attempts=3, delay_s=1.5)
    job = pb.JobState(job_id="job-1", failover_attempts=attempts_so_far)
    assert delay(strategy, job) == (1500, 1500)


@pytest.mark.parametrize("attempts_so_far", [3, 4])
def test_fixed_delay_attempts_exhausted(attempts_so_far: int) -> None:
    strategy = FixedDelayRestart(attempts=3, delay_s=1.5)
    job = pb.JobState(job_id="job-1", failover_attempts=attempts_so_far)
    assert delay(strategy, job) is None


def test_fixed_delay_zero_attempts() -> None:
    strategy = FixedDelayRestart(attempts=0, delay_s=1.0)
    assert delay(strategy, pb.JobState(job_id="job-1")) is None


def test_fixed_delay_ignores_history() -> None:
    strategy = FixedDelayRestart(attempts=5, delay_s=0.25)
    job = pb.JobState(
        job_id="job-1",
        failover_attempts=1,
        last_restart_delay_ms=250,
        last_failure_ms=NOW_MS - 1,
    )
    assert delay(strategy, job) == (250, 250)
