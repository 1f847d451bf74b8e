"""Reading a Prometheus scrape endpoint in tests."""

from __future__ import annotations

import asyncio
import urllib.request


def samples(text: str) -> dict[str, float]:
    """Return the samples of a scrape by metric name and labels, as written."""
    result = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            result[series] = float(value)
    return result


def by_name(text: str) -> dict[str, float]:
    """Return the sum of each metric's samples over all label sets."""
    result: dict[str, float] = {}
    for series, value in samples(text).items():
        name = series.partition("{")[0]
        result[name] = result.get(name, 0.0) + value
    return result


async def scrape(port: int) -> str:
    """Return the text of http://127.0.0.1:PORT/metrics."""

    def fetch() -> str:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(fetch)
