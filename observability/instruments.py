"""The metric instruments of jobledger.

The instruments come from the global meter, so they cost one no-op call
per record until ``Telemetry.start`` installs a meter provider (metrics are
then exported over OTLP and/or served to Prometheus). Durations are in
seconds and sizes in bytes, as the OpenTelemetry conventions name them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

_meter = metrics.get_meter("jobledger")

# Bucket boundaries, as the default ones are sized for milliseconds.
SECONDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
BYTES = tuple(float(4**n) for n in range(5, 18))  # 1 KiB to 16 GiB
EVENTS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)

checkpoint_duration = _meter.create_histogram(
    "jobledger.checkpoint.duration",
    unit="s",
    description="Time from the trigger of a checkpoint to its completion",
    explicit_bucket_boundaries_advisory=SECONDS,
)
checkpoint_size = _meter.create_histogram(
    "jobledger.checkpoint.size",
    unit="By",
    description="State size of a completed checkpoint over all tasks, in bytes",
    explicit_bucket_boundaries_advisory=BYTES,
)
checkpoints_completed = _meter.create_counter(
    "jobledger.checkpoints.completed", description="Checkpoints completed"
)
checkpoints_failed = _meter.create_counter(
    "jobledger.checkpoints.failed",
    description="Checkpoints declined or aborted, by failure reason",
)
checkpoints_expired = _meter.create_counter(
    "jobledger.checkpoints.expired",
    description="Checkpoints whose timeout passed before every task acknowledged",
)
log_append_duration = _meter.create_histogram(
    "jobledger.log.append.duration",
    unit="s",
    description="Time until a decision's events are durable in the event log",
    explicit_bucket_boundaries_advisory=SECONDS,
)
log_append_events = _meter.create_histogram(
    "jobledger.log.append.events",
    description="Events of one decision appended to the event log",
    explicit_bucket_boundaries_advisory=EVENTS,
)
log_commit_events = _meter.create_histogram(
    "jobledger.log.commit.events",
    description="Events of one group commit of the SQLite event log",
    explicit_bucket_boundaries_advisory=EVENTS,
)
replay_duration = _meter.create_histogram(
    "jobledger.replay.duration",
    unit="s",
    description="Time to rebuild the coordinator's state from the event log",
    explicit_bucket_boundaries_advisory=SECONDS,
)
failovers = _meter.create_counter(
    "jobledger.job.failovers",
    description="Jobs failing over after a task or task manager was lost",
)

GaugeSource = Callable[[], Iterable[tuple[float, dict[str, str]]]]


def _observe(source: GaugeSource) -> Callable[[CallbackOptions], list[Observation]]:
    def callback(options: CallbackOptions) -> list[Observation]:
        # Sources read state the event loop changes; a collection that
        # meets a table changing under it skips this round.
        try:
            return [Observation(value, attributes) for value, attributes in source()]
        except RuntimeError:
            return []

    return callback


def register_coordinator_gauges(
    task_managers: GaugeSource, slots_free: GaugeSource
) -> None:
    """Observe the registered task managers and free slots at each collection."""
    _meter.create_observable_gauge(
        "jobledger.task_managers.registered",
        callbacks=[_observe(task_managers)],
        description="Task managers registered and alive",
    )
    _meter.create_observable_gauge(
        "jobledger.slots.free",
        callbacks=[_observe(slots_free)],
        description="Task slots not taken by a task, over alive task managers",
    )


def register_worker_gauges(records_in: GaugeSource, records_out: GaugeSource) -> None:
    """Observe the records each running task read and wrote."""
    _meter.create_observable_counter(
        "jobledger.task.records_in",
        callbacks=[_observe(records_in)],
        description="Records a task read from its source or inputs",
    )
    _meter.create_observable_counter(
        "jobledger.task.records_out",
        callbacks=[_observe(records_out)],
        description="Records a task wrote to its outputs",
    )
