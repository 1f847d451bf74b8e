"""Operators one at a time, with a list as their output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.worker_helpers.jobs import write_events
from worker import durable
from worker.operators import (
    ConfigError,
    OperatorContext,
    create_operator,
    create_source,
)
from worker.operators.sinks import FINAL_TRANSACTION, FileSink
from worker.records import Record
from worker.writer import key_hash


class Collected:
    """An operator output that keeps what it gets."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.watermarks: list[int] = []

    def emit(self, record: Record) -> None:
        self.records.append(record)

    def emit_watermark(self, timestamp: int) -> None:
        self.watermarks.append(timestamp)

    @property
    def values(self) -> list[Any]:
        return [record.value for record in self.records]


def context(subtask: int = 0, parallelism: int = 1, key: str = "") -> OperatorContext:
    return OperatorContext("job-1", "v", subtask, parallelism, 1, key)


def test_csv_source_splits_rows(tmp_path: Path) -> None:
    write_events(tmp_path / "e.csv", 10)
    config = {"path": str(tmp_path / "e.csv"), "types": {"amount": "int"}}
    seen = []
    for subtask in range(3):
        source = create_source("jobledger.source.csv", config, context(subtask, 3))
        source.open()
        while (record := source.poll()) is not None:
            seen.append((subtask, record.value["ts"]))
        source.close()
    rows = sorted(seen, key=lambda item: item[1])
    assert [subtask for subtask, _ in rows] == [i % 3 for i in range(10)]


def test_csv_source_resumes_at_offset(tmp_path: Path) -> None:
    events = write_events(tmp_path / "e.csv", 10)
    config = {"path": str(tmp_path / "e.csv"), "timestamp_field": "ts"}
    source = create_source("jobledger.source.csv", config, context(1, 2))
    source.restore_offsets({"row": 6})
    source.open()
    first = source.poll()
    assert first is not None
    assert first.timestamp == events[7]["ts"]
    assert source.offsets() == {"row": 8}


def test_source_watermark_bounded_out_of_orderness(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps({"ts": ts}) + "\n" for ts in (100, 300, 200)))
    config = {"path": str(path), "timestamp_field": "ts", "out_of_orderness_ms": 50}
    source = create_source("jobledger.source.jsonl", config, context())
    source.open()
    assert source.watermark() is None
    marks = []
    while source.poll() is not None:
        marks.append(source.watermark())
    assert marks == [49, 249, 249]


def test_unknown_operator_rejected() -> None:
    with pytest.raises(ConfigError, match=r"unknown operator 'jobledger\.nope'"):
        create_operator("jobledger.nope", {}, context())


def test_bad_function_rejected() -> None:
    with pytest.raises(ConfigError, match="module:function"):
        create_operator("jobledger.map", {"function": "nocolon"}, context())
    with pytest.raises(ConfigError, match="cannot import"):
        create_operator("jobledger.map", {"function": "no_such_mod:f"}, context())


def test_map_filter_flat_map() -> None:
    helpers = "tests.worker_helpers.functions"
    mapped = create_operator(
        "jobledger.map", {"function": f"{helpers}:double_amount"}, context()
    )
    kept = create_operator(
        "jobledger.filter", {"function": f"{helpers}:is_even_amount"}, context()
    )
    split = create_operator(
        "jobledger.flat_map", {"function": f"{helpers}:split_words"}, context()
    )
    out = Collected()
    mapped.process(Record({"amount": 3}, 5), out)
    kept.process(Record({"amount": 3}), out)
    kept.process(Record({"amount": 4}), out)
    split.process(Record({"text": "a b", "ts": 1}, 7), out)
    assert out.values == [
        {"amount": 6},
        {"amount": 4},
        {"word": "a", "ts": 1},
        {"word": "b", "ts": 1},
    ]
    assert out.records[0].timestamp == 5
    assert out.records[-1].timestamp == 7


def test_aggregate_keyed_state_round_trip() -> None:
    config = {"aggregate": "sum", "field": "amount"}
    first = create_operator("jobledger.aggregate", config, context(key="user"))
    out = Collected()
    for user, amount in (("a", 1), ("b", 2), ("a", 3)):
        first.process(Record({"user": user, "amount": amount}), out)
    assert out.values[-1] == {"key": "a", "value": 4}
    state = json.loads(json.dumps(first.snapshot_state(1)))
    second = create_operator("jobledger.aggregate", config, context(key="user"))
    second.restore_state(state)
    second.process(Record({"user": "b", "amount": 5}), out)
    assert out.values[-1] == {"key": "b", "value": 7}


def test_aggregate_function_and_key_function() -> None:
    helpers = "tests.worker_helpers.functions"
    config = {
        "aggregate": f"{helpers}:product",
        "field": "amount",
        "key": f"{helpers}:user_key",
    }
    operator = create_operator("jobledger.aggregate", config, context())
    out = Collected()
    for amount in (2, 3, 4):
        operator.process(Record({"user": "ann", "amount": amount}), out)
    assert out.values[-1] == {"key": "ANN", "value": 24}


def window(lateness: int = 0) -> Any:
    config = {
        "size_ms": 100,
        "allowed_lateness_ms": lateness,
        "aggregate": "count",
        "key": "k",
    }
    return create_operator("jobledger.window.tumbling", config, context())


def test_window_fires_on_watermark() -> None:
    operator, out = window(), Collected()
    for ts in (10, 50, 120):
        operator.process(Record({"k": "x"}, ts), out)
    operator.on_watermark(98, out)
    assert out.values == []
    operator.on_watermark(99, out)
    assert out.values == [
        {"key": "x", "window_start": 0, "window_end": 100, "value": 2}
    ]
    assert out.watermarks == [98, 99]


def test_window_late_record_fires_again() -> None:
    operator, out = window(lateness=50), Collected()
    operator.process(Record({"k": "x"}, 10), out)
    operator.on_watermark(120, out)
    operator.process(Record({"k": "x"}, 20), out)
    operator.process(Record({"k": "x"}, 30), out)
    assert [v["value"] for v in out.values] == [1, 2, 3]
    operator.on_watermark(150, out)
    operator.process(Record({"k": "x"}, 40), out)
    assert [v["value"] for v in out.values] == [1, 2, 3]
    assert operator.dropped == 1


def test_window_state_round_trip() -> None:
    operator, out = window(), Collected()
    operator.process(Record({"k": "x"}, 10), out)
    state = json.loads(json.dumps(operator.snapshot_state(1)))
    restored = window()
    restored.restore_state(state)
    restored.process(Record({"k": "x"}, 20), out)
    restored.on_watermark(200, out)
    assert out.values[-1]["value"] == 2


def test_window_requires_size() -> None:
    with pytest.raises(ConfigError, match="size_ms"):
        create_operator("jobledger.window.tumbling", {"key": "k"}, context())


def file_sink(tmp_path: Path, mode: str = "append") -> FileSink:
    config = {"path": str(tmp_path / "out.jsonl"), "mode": mode, "key": "k"}
    sink = create_operator("jobledger.sink.file", config, context())
    assert isinstance(sink, FileSink)
    sink.open()
    sink.recover(0)
    return sink


def lines(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_file_sink_commits_on_completion(tmp_path: Path) -> None:
    sink, out = file_sink(tmp_path), Collected()
    sink.process(Record({"k": 1}), out)
    sink.snapshot_state(1)
    sink.process(Record({"k": 2}), out)
    sink.snapshot_state(2)
    assert not (tmp_path / "out.jsonl").exists()
    sink.notify_checkpoint_complete(1)
    assert lines(tmp_path / "out.jsonl") == [{"k": 1}]
    sink.notify_checkpoint_complete(2)
    sink.notify_checkpoint_complete(2)
    assert lines(tmp_path / "out.jsonl") == [{"k": 1}, {"k": 2}]


def test_file_sink_recovery_finishes_commit(tmp_path: Path) -> None:
    sink, out = file_sink(tmp_path), Collected()
    sink.process(Record({"k": 1}), out)
    sink.notify_checkpoint_complete(0)
    state = sink.snapshot_state(3)
    sink.process(Record({"k": 2}), out)
    sink.snapshot_state(4)
    # The worker dies before checkpoint 3's notification; 3 completed.
    restored = file_sink_restored(tmp_path, state, 3)
    assert lines(tmp_path / "out.jsonl") == [{"k": 1}]
    assert list((tmp_path / "out.jsonl.staging").iterdir()) == []
    restored.process(Record({"k": 2}), out)
    restored.finish(out)
    assert lines(tmp_path / "out.jsonl") == [{"k": 1}, {"k": 2}]


def file_sink_restored(tmp_path: Path, state: Any, checkpoint_id: int) -> FileSink:
    config = {"path": str(tmp_path / "out.jsonl")}
    sink = create_operator("jobledger.sink.file", config, context())
    assert isinstance(sink, FileSink)
    sink.restore_state(json.loads(json.dumps(state)))
    sink.open()
    sink.recover(checkpoint_id)
    return sink


def test_file_sink_interrupted_commit_redone(tmp_path: Path) -> None:
    sink, out = file_sink(tmp_path), Collected()
    sink.process(Record({"k": 1}), out)
    state = sink.snapshot_state(1)
    # A crash in the middle of the append: half a line, no commit log entry.
    (tmp_path / "out.jsonl").write_bytes(b'{"k": ')
    file_sink_restored(tmp_path, state, 1)
    assert lines(tmp_path / "out.jsonl") == [{"k": 1}]


def test_file_sink_rewinds_final_commit(tmp_path: Path) -> None:
    sink, out = file_sink(tmp_path), Collected()
    sink.process(Record({"k": 1}), out)
    state = sink.snapshot_state(1)
    sink.notify_checkpoint_complete(1)
    sink.process(Record({"k": 2}), out)
    sink.finish(out)
    log = json.loads((tmp_path / "out.jsonl.commits.json").read_text())
    assert [entry[0] for entry in log] == [1, FINAL_TRANSACTION]
    file_sink_restored(tmp_path, state, 1)
    assert lines(tmp_path / "out.jsonl") == [{"k": 1}]


def test_upsert_sink_keeps_latest_per_key(tmp_path: Path) -> None:
    sink, out = file_sink(tmp_path, "upsert"), Collected()
    for k, v in (("b", 1), ("a", 2), ("b", 3)):
        sink.process(Record({"k": k, "v": v}), out)
    sink.snapshot_state(1)
    sink.notify_checkpoint_complete(1)
    assert lines(tmp_path / "out.jsonl") == [{"k": "a", "v": 2}, {"k": "b", "v": 3}]


def test_file_sink_needs_subtask_placeholder(tmp_path: Path) -> None:
    config = {"path": str(tmp_path / "out.jsonl")}
    with pytest.raises(ConfigError, match="subtask"):
        create_operator("jobledger.sink.file", config, context(0, 2))


def test_print_sink(capsys: pytest.CaptureFixture[str]) -> None:
    sink = create_operator("jobledger.sink.print", {"prefix": "> "}, context())
    sink.process(Record({"a": 1}), Collected())
    assert capsys.readouterr().out == '> {"a": 1}\n'


def test_file_sink_recovery_removes_temporaries(tmp_path: Path) -> None:
    sink, out = file_sink(tmp_path), Collected()
    sink.process(Record({"k": 1}), out)
    state = sink.snapshot_state(1)
    # What a SIGKILL in the middle of three atomic writes leaves behind.
    leftovers = [
        tmp_path / "out.jsonl.staging" / ".2.jsonl.4242.tmp",
        tmp_path / ".out.jsonl.commits.json.4242.tmp",
        tmp_path / ".out.jsonl.4242.tmp",
    ]
    for leftover in leftovers:
        leftover.write_bytes(b"torn")
    unrelated = tmp_path / ".other.4242.tmp"
    unrelated.write_bytes(b"not the sink's")
    file_sink_restored(tmp_path, state, 1)
    assert [path for path in leftovers if path.exists()] == []
    assert unrelated.exists()
    assert lines(tmp_path / "out.jsonl") == [{"k": 1}]


def test_atomic_write_syncs_new_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real = durable.fsync_directory

    def record(directory: Path) -> None:
        synced.append(directory)
        real(directory)

    monkeypatch.setattr(durable, "fsync_directory", record)
    target = tmp_path / "job" / "task" / "chk-1.json"
    durable.write_atomically(target, b"{}")
    # The entries of "job" and "task" and of the file itself are durable.
    assert synced == [tmp_path, tmp_path / "job", tmp_path / "job" / "task"]
    assert target.read_bytes() == b"{}"
    assert list(target.parent.iterdir()) == [target]


def round_trip(state: Any) -> Any:
    """Return the state as a snapshot file gives it back."""
    return json.loads(json.dumps(state))


def test_tuple_key_survives_restore() -> None:
    config = {
        "key": "tests.worker_helpers.functions:user_and_parity",
        "aggregate": "sum",
        "field": "amount",
    }
    first = create_operator("jobledger.aggregate", config, context())
    first.process(Record({"user": "ann", "amount": 3}), Collected())
    restored = create_operator("jobledger.aggregate", config, context())
    restored.restore_state(round_trip(first.snapshot_state(1)))
    out = Collected()
    restored.process(Record({"user": "ann", "amount": 5}), out)
    assert out.values[0]["value"] == 8
    assert len(restored.snapshot_state(2)) == 1


def upsert_sink(tmp_path: Path, state: Any = None, checkpoint_id: int = 0) -> FileSink:
    """Return an upsert sink keyed by a tuple, restored from ``state`` if given."""
    config = {
        "path": str(tmp_path / "out.jsonl"),
        "mode": "upsert",
        "key": "tests.worker_helpers.functions:k_and_zero",
    }
    sink = create_operator("jobledger.sink.file", config, context())
    assert isinstance(sink, FileSink)
    if state is not None:
        sink.restore_state(round_trip(state))
    sink.open()
    sink.recover(checkpoint_id)
    return sink


def test_upsert_tuple_key_survives_restore(tmp_path: Path) -> None:
    sink, out = upsert_sink(tmp_path), Collected()
    sink.process(Record({"k": "a", "v": 1}), out)
    state = sink.snapshot_state(1)
    sink.notify_checkpoint_complete(1)
    restored = upsert_sink(tmp_path, state, 1)
    restored.process(Record({"k": "a", "v": 2}), out)
    restored.snapshot_state(2)
    restored.notify_checkpoint_complete(2)
    assert lines(tmp_path / "out.jsonl") == [{"k": "a", "v": 2}]


def test_key_hash_same_for_tuple_and_list() -> None:
    assert key_hash(("ann", 1)) == key_hash(["ann", 1])
    assert key_hash(1) != key_hash("1")
