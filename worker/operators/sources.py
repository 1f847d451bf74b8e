"""File sources: CSV and JSON lines, split across subtasks by row number."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from worker.operators.base import ConfigError, OperatorContext, optional, required
from worker.records import Record

OFFSET_KEY = "row"

_CONVERTERS = {"int": int, "float": float, "str": str}


class FileSource:
    """Reads a file and emits row i on subtask ``i % parallelism``.

    Configuration: ``path``; ``timestamp_field`` (event time in ms, optional);
    ``out_of_orderness_ms`` (bounded out-of-orderness of the watermarks,
    default 0); ``types`` (CSV only: field name to "int", "float" or "str");
    ``delay_ms`` (a pause after each row, to pace a demo or a test).

    The offset is the number of the next row of the whole file to read, under
    the key "row", so a restored subtask skips what it emitted before the
    checkpoint.
    """

    format_name = ""

    def __init__(self, config: dict[str, Any], context: OperatorContext) -> None:
        self.context = context
        self.path = Path(required(config, "path", str))
        self.timestamp_field: str | None = optional(
            config, "timestamp_field", str, None
        )
        self.out_of_orderness_ms: int = optional(config, "out_of_orderness_ms", int, 0)
        self.delay_s = optional(config, "delay_ms", float, 0.0) / 1000
        self.types = self._converters(optional(config, "types", dict, {}))
        if not self.path.is_file():
            raise ConfigError(f"source file {self.path} does not exist")
        self.next_row = 0
        self.max_timestamp: int | None = None
        self._file: IO[str] | None = None
        self._rows: Iterator[tuple[int, Any]] | None = None

    def _converters(self, types: dict[str, Any]) -> dict[str, Any]:
        converters = {}
        for field, name in types.items():
            if name not in _CONVERTERS:
                raise ConfigError(
                    f"type {name!r} of field {field!r} is unknown; "
                    f"give one of {', '.join(sorted(_CONVERTERS))}"
                )
            converters[field] = _CONVERTERS[name]
        return converters

    def restore_offsets(self, offsets: Mapping[str, int]) -> None:
        """Resume at the offsets a checkpoint recorded; call before ``open``."""
        self.next_row = int(offsets.get(OFFSET_KEY, 0))

    def offsets(self) -> dict[str, int]:
        """Return the offsets to resume at after everything emitted so far."""
        return {OFFSET_KEY: self.next_row}

    def open(self) -> None:
        self._file = self.path.open(newline="", encoding="utf-8")
        self._rows = enumerate(self._parse(self._file))

    def poll(self) -> Record | None:
        """Return this subtask's next record, or None at the end of the file."""
        assert self._rows is not None, "poll before open"
        for index, value in self._rows:
            if index < self.next_row or index % self.context.parallelism != (
                self.context.subtask_index
            ):
                continue
            self.next_row = index + 1
            return self._record(value)
        return None

    def watermark(self) -> int | None:
        """Return the current watermark, or None before the first timestamp."""
        if self.max_timestamp is None:
            return None
        return self.max_timestamp - self.out_of_orderness_ms - 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _record(self, value: Any) -> Record:
        if self.timestamp_field is None:
            return Record(value)
        try:
            timestamp = int(value[self.timestamp_field])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"row {self.next_row - 1} of {self.path} has no integer "
                f"timestamp field {self.timestamp_field!r}"
            ) from exc
        if self.max_timestamp is None or timestamp > self.max_timestamp:
            self.max_timestamp = timestamp
        return Record(value, timestamp)

    def _parse(self, file: IO[str]) -> Iterator[Any]:
        raise NotImplementedError


class CsvSource(FileSource):
    """A CSV file with a header row; each data row becomes an object."""

    def _parse(self, file: IO[str]) -> Iterator[Any]:
        for row in csv.DictReader(file):
            yield {
                field: self.types[field](text) if field in self.types else text
                for field, text in row.items()
            }


class JsonLinesSource(FileSource):
    """A file of one JSON value per line; blank lines are skipped."""

    def _parse(self, file: IO[str]) -> Iterator[Any]:
        for line in file:
            if line.strip():
                yield json.loads(line)
