"""Fixtures shared by the test suite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import (
    Cluster,
    assert_same_state,
    replayed_state,
    start_cluster,
    stop_cluster,
)


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
