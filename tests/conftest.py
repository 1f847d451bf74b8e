"""Fixtures shared by the test suite."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from observability import setup
from observability.settings import TelemetrySettings
from tests.harness import (
    Cluster,
    assert_same_state,
    replayed_state,
    start_cluster,
    stop_cluster,
)
from tests.helpers.otlp_collector import TraceCollector, running_collector


@pytest.fixture
async def cluster(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Cluster]:
    """A coordinator on a fresh log; afterwards its log must replay to the
    live state, field by field."""
    marker = request.node.get_closest_marker("coordinator")
    overrides = dict(marker.kwargs) if marker else {}
    path = tmp_path / "log.db"
    running = await start_cluster(path, **overrides)
    try:
        yield running
    finally:
        live = await stop_cluster(running)
    replayed = await replayed_state(path)
    # The lease release at stop adds no event, so the states match exactly.
    assert_same_state(live, replayed)


@pytest.fixture
def collector() -> Iterator[TraceCollector]:
    """An OTLP trace collector on 127.0.0.1, on a free port."""
    with running_collector() as servicer:
        yield servicer


@pytest.fixture
def telemetry(collector: TraceCollector) -> Iterator[setup.Telemetry]:
    """Telemetry of this process, started, exporting spans to ``collector``."""
    settings = TelemetrySettings(
        service_name="jobledger-test",
        traces_endpoint=f"http://127.0.0.1:{collector.port}",
    )
    telemetry = setup.Telemetry(settings, "test:1")
    telemetry.start()
    yield telemetry
    telemetry.shutdown()
