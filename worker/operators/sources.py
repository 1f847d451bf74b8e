"""File sources: CSV and JSON lines, split across subtasks by row number."""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from worker.operators.base import (
    ConfigError,
    OperatorContext,
    key_selector,
    optional,
    required,
)
from worker.records import Record

OFFSET_KEY = "row"

_CONVERTERS = {"int": int, "float": float, "str": str}


class FileSource:
    """Reads a file and emits row i on subtask ``i % parallelism``.

    Configuration: ``path``; ``timestamp_field`` (optional: the field that
    contains the event time in ms, or a ``module:function`` that returns it from
    the value); ``out_of_orderness_ms`` (bounded out-of-orderness of the
    watermarks, default 0); ``types`` (CSV only: field name to "int",
    "float" or "str"); ``delay_ms`` (a pause after each row on average, to
    pace a demo or a test).

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
        self.timestamp_of: Callable[[Any], Any] | None = None
        if self.timestamp_field is not None:
            self.timestamp_of = key_selector(self.timestamp_field, "timestamp_field")
        self.out_of_orderness_ms: int = optional(config, "out_of_orderness_ms", int, 0)
        self.delay_s = optional(config, "delay_ms", float, 0.0) / 1000
        self.types = self._converters(optional(config, "types", dict, {}))
        if not self.path.is_file():
            raise ConfigError(f"source file {self.path} does not exist")
        self.next_row = 0
        self.max_timestamp: int | None = None
        self._file: IO[str] | None = None
        self._rows: Iterator[tuple[int, Any]] | None = None
        # Raw rows are converted only on the subtask that emits them.
        self._convert: Callable[[Any], Any] = self._value

    def _converters(self, types: dict[str, Any]) -> dict[str, Any]:
        converters = {}
        for field, name in types.items():
            if not isinstance(name, str) or name not in _CONVERTERS:
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
        self._rows = enumerate(self._split(self._file))

    def poll(self) -> Record | None:
        """Return this subtask's next record, or None at the end of the file."""
        assert self._rows is not None, "poll before open"
        parallelism = self.context.parallelism
        subtask = self.context.subtask_index
        for index, raw in self._rows:
            if index < self.next_row or index % parallelism != subtask:
                continue
            self.next_row = index + 1
            return self._record(self._convert(raw))
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
        if self.timestamp_of is None:
            return Record(value)
        try:
            timestamp = int(self.timestamp_of(value))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"row {self.next_row - 1} of {self.path} has no integer "
                f"timestamp from {self.timestamp_field!r}: {exc}"
            ) from exc
        if self.max_timestamp is None or timestamp > self.max_timestamp:
            self.max_timestamp = timestamp
        return Record(value, timestamp)

    def _split(self, file: IO[str]) -> Iterator[Any]:
        """Yield the file's rows in a cheap raw form; ``_convert`` turns one
        into its value, on the subtask that emits it only."""
        raise NotImplementedError

    def _value(self, raw: Any) -> Any:
        raise NotImplementedError


class CsvSource(FileSource):
    """A CSV file with a header row; each data row becomes an object."""

    def _split(self, file: IO[str]) -> Iterator[Any]:
        rows = csv.reader(file)
        header = next(rows, None)
        if header is None:
            return
        converters = [self.types.get(field) for field in header]
        if any(converters):
            self._convert = functools.partial(_typed_row, header, converters)
        else:
            self._convert = functools.partial(_row, header)
        # Blank lines are no rows, as in csv.DictReader.
        yield from filter(None, rows)


def _row(header: list[str], row: list[str]) -> dict[str, Any]:
    # A short row lacks the missing fields (csv.DictReader set them to None)
    # and a long row loses its extra fields.
    return dict(zip(header, row, strict=False))


def _typed_row(
    header: list[str], converters: list[Callable[[str], Any] | None], row: list[str]
) -> dict[str, Any]:
    return {
        field: text if convert is None else convert(text)
        for field, convert, text in zip(header, converters, row, strict=False)
    }


class JsonLinesSource(FileSource):
    """A file of one JSON value per line; blank lines are skipped."""

    def _split(self, file: IO[str]) -> Iterator[Any]:
        for line in file:
            if line.strip():
                yield line

    def _value(self, raw: Any) -> Any:
        return json.loads(raw)
