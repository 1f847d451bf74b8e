"""The flight-delays job's functions and the operator features it relies on:
event time from a function, late windows, and the whole chain in process."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from coordinator.demo import sink_paths
from coordinator.jobspec import load_job_graph
from jobledger_examples import flights
from worker.operators import (
    ConfigError,
    OperatorContext,
    create_operator,
    create_source,
)
from worker.records import MAX_WATERMARK, Record

FIELDS = ["year", "month", "day", "sched_dep_time", "dep_delay", "carrier"]
SPEC = Path(__file__).resolve().parent.parent / "examples" / "flight_delays.yaml"
TIMESTAMP = "jobledger_examples.flights:scheduled_departure_ms"


class Collected:
    """An operator output that keeps what it gets."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.watermarks: list[int] = []

    def emit(self, record: Record) -> None:
        self.records.append(record)

    def emit_watermark(self, timestamp: int) -> None:
        self.watermarks.append(timestamp)


class Chain:
    """Operators wired one after another, ending in a Collected."""

    def __init__(self, operators: list[Any]) -> None:
        self.operators = operators
        self.end = Collected()

    def emit(self, record: Record, position: int = 0) -> None:
        if position == len(self.operators):
            self.end.emit(record)
            return
        self.operators[position].process(record, _Next(self, position + 1))

    def emit_watermark(self, timestamp: int, position: int = 0) -> None:
        if position == len(self.operators):
            self.end.emit_watermark(timestamp)
            return
        self.operators[position].on_watermark(timestamp, _Next(self, position + 1))


class _Next:
    def __init__(self, chain: Chain, position: int) -> None:
        self.chain = chain
        self.position = position

    def emit(self, record: Record) -> None:
        self.chain.emit(record, self.position)

    def emit_watermark(self, timestamp: int) -> None:
        self.chain.emit_watermark(timestamp, self.position)


def context(subtask: int = 0, parallelism: int = 1, key: str = "") -> OperatorContext:
    return OperatorContext("job-1", "v", subtask, parallelism, 1, key)


def write_flights(path: Path, rows: list[tuple[Any, ...]]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(FIELDS)
        writer.writerows(rows)


# Months out of order, as in the real file: January, October, then February.
ROWS = [
    (2013, 1, 1, 515, 2, "UA"),
    (2013, 1, 1, 600, 20, "UA"),
    (2013, 1, 1, 610, "NA", "UA"),
    (2013, 1, 2, 700, -3, "AA"),
    (2013, 10, 5, 900, 40, "UA"),
    (2013, 2, 1, 830, 16, "UA"),
    (2013, 1, 1, 2359, 15, "UA"),
    (2013, 2, 1, 1200, 1, "AA"),
]


# ---------------------------------------------------------------- functions


def test_scheduled_departure_is_local_time_as_utc() -> None:
    value = {"year": "2013", "month": "1", "day": "2", "sched_dep_time": "2359"}
    timestamp = flights.scheduled_departure_ms(value)
    assert timestamp == 1357084800000 + (23 * 60 + 59) * 60_000
    assert flights.date_of(timestamp) == "2013-01-02"


def test_departed_drops_missing_delay() -> None:
    assert flights.departed({"dep_delay": "-4"})
    assert not flights.departed({"dep_delay": "NA"})
    assert not flights.departed({"dep_delay": ""})


def test_add_delay_returns_new_accumulator() -> None:
    first = flights.add_delay(None, {"dep_delay": 16})
    second = flights.add_delay(first, {"dep_delay": -2})
    assert first == [1, 16, 16, 1]
    assert second == [2, 14, 16, 1]


def test_daily_row_rounds_from_integer_sums() -> None:
    result = {"key": "UA", "window_start": 1357084800000, "value": [3, 10, 9, 1]}
    assert flights.daily_row(result) == {
        "carrier": "UA",
        "date": "2013-01-02",
        "flights": 3,
        "total_dep_delay": 10,
        "mean_dep_delay": 3.3333,
        "max_dep_delay": 9,
        "share_delayed_15": 0.3333,
    }


def test_extract_writes_prefix(tmp_path: Path) -> None:
    written = flights.extract(tmp_path / "f.csv", rows=25)
    lines = (tmp_path / "f.csv").read_text().splitlines()
    assert written == 25
    assert len(lines) == 26
    assert lines[0].startswith("year,month,day,dep_time,sched_dep_time,dep_delay")


def test_direct_computation_of_small_file(tmp_path: Path) -> None:
    write_flights(tmp_path / "f.csv", ROWS)
    rows = flights.daily_delays(tmp_path / "f.csv")
    assert sorted(rows) == [
        ("AA", "2013-01-02"),
        ("AA", "2013-02-01"),
        ("UA", "2013-01-01"),
        ("UA", "2013-02-01"),
        ("UA", "2013-10-05"),
    ]
    assert rows[("UA", "2013-01-01")]["flights"] == 3
    assert rows[("UA", "2013-01-01")]["max_dep_delay"] == 20
    assert rows[("UA", "2013-01-01")]["share_delayed_15"] == 0.3333


def test_worst_carriers_ranks_by_mean(tmp_path: Path) -> None:
    write_flights(tmp_path / "f.csv", ROWS)
    ranked = flights.worst_carriers(flights.daily_delays(tmp_path / "f.csv"), 2)
    assert [item["carrier"] for item in ranked] == ["UA", "AA"]
    assert ranked[0] == {"carrier": "UA", "flights": 5, "mean_dep_delay": 18.6}


# ---------------------------------------------------------------- operators


def test_source_timestamp_from_function(tmp_path: Path) -> None:
    write_flights(tmp_path / "f.csv", ROWS[:2])
    config = {"path": str(tmp_path / "f.csv"), "timestamp_field": TIMESTAMP}
    source = create_source("jobledger.source.csv", config, context())
    source.open()
    first = source.poll()
    assert first is not None
    assert first.timestamp == flights.scheduled_departure_ms(first.value)
    assert first.value["sched_dep_time"] == "515"
    assert source.watermark() == first.timestamp - 1


def test_source_timestamp_function_missing(tmp_path: Path) -> None:
    write_flights(tmp_path / "f.csv", ROWS[:1])
    config = {"path": str(tmp_path / "f.csv"), "timestamp_field": "nowhere:at_all"}
    with pytest.raises(ConfigError, match="timestamp_field"):
        create_source("jobledger.source.csv", config, context())


def test_source_skips_blank_lines_like_dictreader(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_text("a,b\n1,2\n\n3,4\n")
    source = create_source("jobledger.source.csv", {"path": str(path)}, context())
    source.open()
    values = []
    while (record := source.poll()) is not None:
        values.append(record.value)
    assert values == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]
    assert source.offsets() == {"row": 2}


def window(lateness: int = 1000) -> Any:
    config = {
        "size_ms": 100,
        "allowed_lateness_ms": lateness,
        "aggregate": "count",
        "key": "k",
    }
    return create_operator("jobledger.window.tumbling", config, context())


def test_late_record_opening_window_fires_at_once() -> None:
    operator, out = window(), Collected()
    operator.on_watermark(500, out)
    operator.process(Record({"k": "x"}, 120), out)
    assert [r.value for r in out.records] == [
        {"key": "x", "window_start": 100, "window_end": 200, "value": 1}
    ]
    operator.on_watermark(600, out)
    assert len(out.records) == 1


def test_window_fires_in_order_of_start() -> None:
    operator, out = window(), Collected()
    for key, timestamp in (("b", 250), ("a", 10), ("c", 120), ("a", 260)):
        operator.process(Record({"k": key}, timestamp), out)
    operator.on_watermark(199, out)
    operator.on_watermark(299, out)
    fired = [(r.value["key"], r.value["window_start"]) for r in out.records]
    assert fired == [("a", 0), ("c", 100), ("a", 200), ("b", 200)]


def test_window_restore_keeps_fired_state() -> None:
    operator, out = window(), Collected()
    operator.process(Record({"k": "x"}, 10), out)
    operator.process(Record({"k": "y"}, 150), out)
    operator.on_watermark(99, out)
    state = json.loads(json.dumps(operator.snapshot_state(1)))
    restored, after = window(), Collected()
    restored.restore_state(state)
    restored.on_watermark(199, after)
    # Only the window that had not fired before the snapshot fires now.
    assert [r.value["key"] for r in after.records] == ["y"]
    restored.process(Record({"k": "x"}, 20), after)
    assert after.records[-1].value["value"] == 2


def test_window_expires_after_lateness() -> None:
    operator, out = window(lateness=50), Collected()
    operator.process(Record({"k": "x"}, 10), out)
    operator.on_watermark(149, out)
    assert len(operator.windows) == 1
    operator.on_watermark(150, out)
    assert operator.windows == {}
    operator.process(Record({"k": "x"}, 20), out)
    assert operator.dropped == 1


# ---------------------------------------------------------------- the job


def spec_operators(tmp_path: Path) -> tuple[Any, Chain, Chain]:
    """Build the job's operators from the YAML spec, with paths in tmp_path."""
    graph = load_job_graph(SPEC)
    vertices = {vertex.id: vertex for vertex in graph.vertices}
    built = {}
    for vertex_id, key in (("flights", ""), ("daily", "carrier")):
        vertex = vertices[vertex_id]
        definitions = [vertex.operator_definition, *vertex.chained_operators]
        configs = []
        for definition in definitions:
            config = json.loads(
                json.dumps(dict(definition.configuration.items()), default=dict)
            )
            if "path" in config:
                config["path"] = str(tmp_path / config["path"])
            configs.append((definition.fully_qualified_name, config))
        built[vertex_id] = (configs, key)
    (source_name, source_config), *source_chain = built["flights"][0]
    source = create_source(source_name, source_config, context())
    first = Chain([create_operator(n, c, context()) for n, c in source_chain])
    last = Chain(
        [create_operator(n, c, context(key="carrier")) for n, c in built["daily"][0]]
    )
    return source, first, last


def test_spec_chain_equals_direct_computation(tmp_path: Path) -> None:
    write_flights(tmp_path / "flights.csv", ROWS)
    (tmp_path / "output").mkdir()
    source, first, last = spec_operators(tmp_path)
    source.open()
    for operator in last.operators:
        operator.open()
    while (record := source.poll()) is not None:
        first.emit(record)
        for forwarded in first.end.records:
            last.emit(forwarded)
        first.end.records.clear()
        watermark = source.watermark()
        if watermark is not None:
            last.emit_watermark(watermark)
    last.emit_watermark(MAX_WATERMARK)
    for operator in last.operators:
        operator.finish(last.end)
    graph = load_job_graph(SPEC)
    output = flights.read_output(sink_paths(graph, tmp_path))
    assert output == flights.daily_delays(tmp_path / "flights.csv")
    # The final watermark expired every window.
    assert last.operators[0].windows == {}


def test_csv_source_quoted_line_breaks(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text(
        'a,b\r\n1,"two\r\nlines"\r\n\r\n3,"say ""hi"", bye"\r\n5,6\r\n7,"x\ny\nz"\n'
    )
    with path.open(newline="") as file:
        expected = list(csv.DictReader(file))
    seen: dict[int, Any] = {}
    for subtask in range(2):
        source = create_source(
            "jobledger.source.csv", {"path": str(path)}, context(subtask, 2)
        )
        source.open()
        while (record := source.poll()) is not None:
            seen[source.offsets()["row"] - 1] = record.value
        source.close()
    assert [seen[index] for index in sorted(seen)] == expected
    assert sorted(seen) == list(range(len(expected)))
