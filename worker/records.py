"""The elements that flow through a task: records, watermarks, barriers and
the end of input, and their encoding in DataRecord payloads.

A record's value is any JSON value (usually an object); its timestamp is
event time in milliseconds since the epoch, or None. On the wire a record is
the JSON document ``{"v": value, "t": timestamp}``. A sender that announces
batching (see ``BATCH_METADATA_KEY``) puts a JSON array of such documents in
one ``data_payload``. Any other sender sends one document per message, and a
payload of another shape is decoded as a bare value without timestamp.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

# Stream metadata entry a sender sets to "1" when its data payloads are
# JSON arrays of records.
BATCH_METADATA_KEY = "jobledger-record-batch"

# Event time that ends every window: sent when a source reaches the end.
MAX_WATERMARK = 2**63 - 1


@dataclasses.dataclass(slots=True)
class Record:
    """One data record: a JSON value and its event time in ms, if any."""

    value: Any
    timestamp: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Watermark:
    """Event time up to which no earlier record is expected, in ms."""

    timestamp: int


@dataclasses.dataclass(frozen=True, slots=True)
class Barrier:
    """A checkpoint barrier, injected by sources and aligned by tasks."""

    checkpoint_id: int
    checkpoint_timestamp: int
    # The checkpoint's trace context as barrier ``checkpoint_options``
    # (see observability.propagation); b"" when the checkpoint is not traced.
    trace_options: bytes = b""


@dataclasses.dataclass(frozen=True, slots=True)
class EndOfInput:
    """The last element of a channel: its upstream subtask has finished."""


Element = Record | Watermark | Barrier | EndOfInput

END_OF_INPUT = EndOfInput()


_SCALARS = (str, int, float, bool, type(None))


def key_text(key: Any) -> str:
    """Return the text that identifies a key in keyed state and in routing.

    A key that crossed the wire or a snapshot is decoded from JSON, where a
    tuple comes back as a list, so a tuple and a list with the same items
    must give the same text. Scalars use ``repr`` (which keeps 1 and "1"
    apart), containers JSON. Raises TypeError for a key that is no JSON value.
    """
    if type(key) in _SCALARS:
        return repr(key)
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def encode_records(records: list[Record]) -> bytes:
    """Encode records as one batched data payload."""
    return json.dumps(
        [{"v": r.value, "t": r.timestamp} for r in records], separators=(",", ":")
    ).encode()


def encode_record(record: Record) -> bytes:
    """Encode one record as an unbatched data payload."""
    document = {"v": record.value, "t": record.timestamp}
    return json.dumps(document, separators=(",", ":")).encode()


def decode_payload(payload: bytes, batched: bool) -> list[Record]:
    """Decode a data payload into records.

    Raises ValueError when the payload is not JSON, or when a batched
    payload is not an array.
    """
    document = json.loads(payload)
    if not batched:
        return [_decode_document(document)]
    if not isinstance(document, list):
        raise ValueError("a batched data payload must be a JSON array of records")
    return [_decode_document(item) for item in document]


def _decode_document(document: Any) -> Record:
    # Checked field by field rather than with a set: this runs once per record.
    if (
        type(document) is dict
        and len(document) == 2
        and "v" in document
        and "t" in document
    ):
        timestamp = document["t"]
        return Record(document["v"], int(timestamp) if timestamp is not None else None)
    return Record(document, None)
