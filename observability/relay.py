"""Span export in a process of its own, fed through a pipe.

The coordinator serves thousands of RPCs a second on one thread, each with
a span. Sending spans from inside the coordinator costs that thread more
than recording them: an export thread in the same process takes the
interpreter lock for every batch it encodes, parses and sends. So the span
processor here, ``SpanRelay``, only queues each finished span, as a
record of plain values. A thread of its own wakes every ``HAND_OVER_S`` and
writes what is queued, in one ``marshal`` call, to a child process,
``python -m observability.relay``, which runs at a lower CPU priority. The
child encodes the spans to OTLP wire bytes and batches them as the batch
span processor would (OTEL_BSP_SCHEDULE_DELAY,
OTEL_BSP_MAX_EXPORT_BATCH_SIZE, OTEL_BSP_MAX_QUEUE_SIZE). It sends them
with the standard OTLP/gRPC exporter, which reads the rest of its settings
(headers, TLS, compression, timeout) from the environment it inherits.

Frames on the child's stdin are a header (kind, number, payload length)
and a payload. SPANS frames carry ``number`` spans: the resource and scope
fields, the records, and the encoded SDK spans. A FLUSH frame requests the
child to export everything before it and then write ``number`` back on its
stdout. When stdin closes, because the parent shut down or died, even by
SIGKILL, the child exports what it holds, for at most one export timeout,
and exits. A parent killed with SIGKILL loses only the spans of its last
``HAND_OVER_S``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import logging
import marshal
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import IO

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from observability.otlp import (
    SpanRecord,
    encode_request,
    encode_span,
    scope_fields,
)
from observability.rpcspans import RpcSpan

logger = logging.getLogger(__name__)

# How often the parent hands its queued spans to the child, at most.
HAND_OVER_S = 0.1
# How much lower than its parent's the export process's CPU priority is.
NICENESS = 10
# A child that died is replaced at most this often.
RESPAWN_S = 5.0
# Time for the child to exit after its export timeout ran out.
EXIT_GRACE_S = 5.0
# Dropped and lost spans are counted and logged at most this often.
WARN_EVERY_S = 1.0
# The shortest time a child may take no input before it is taken as stuck.
WRITE_TIMEOUT_S = 5.0

SPANS = 1
FLUSH = 2
# kind, number (spans of a SPANS frame, id of a FLUSH frame), payload length
_HEADER = struct.Struct("<BII")
# The id of a FLUSH frame, and whether every span before it was sent.
_FLUSH_REPLY = struct.Struct("<I?")


@dataclasses.dataclass(frozen=True, slots=True)
class ExportSettings:
    """The endpoint the child sends spans to, and the batching it applies."""

    endpoint: str
    insecure: bool = True
    schedule_delay_s: float = 5.0
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    # The maximum time of one export with its retries: the exporter's
    # timeout setting.
    export_timeout_s: float = 10.0

    def arguments(self) -> list[str]:
        """Return the command-line arguments that give the child these settings."""
        return [
            f"--endpoint={self.endpoint}",
            f"--insecure={'true' if self.insecure else 'false'}",
            f"--schedule-delay-s={self.schedule_delay_s}",
            f"--max-queue-size={self.max_queue_size}",
            f"--max-export-batch-size={self.max_export_batch_size}",
            f"--export-timeout-s={self.export_timeout_s}",
        ]


class SpanRelay(SpanProcessor):
    """Queues finished spans and hands them to the export process.

    ``on_end`` only appends to a deque, so it is cheap and safe from any
    thread. Spans beyond ``max_queue_size`` waiting for the hand-over are
    dropped and counted in a warning. A child that exits is replaced, at
    most every ``RESPAWN_S``, and the spans meant for it in between are
    lost and counted in a warning. The spans a child held when it died are
    lost with it, uncounted. Those warnings come at most every
    ``WARN_EVERY_S``.
    """

    def __init__(
        self,
        resource: Resource,
        scope_name: str,
        settings: ExportSettings,
        command: list[str] | None = None,
    ) -> None:
        self._scope = scope_fields(resource, scope_name)
        self.settings = settings
        # Read on every span.
        self._max_queue_size = settings.max_queue_size
        self._batch_size = settings.max_export_batch_size
        self._command = command or [sys.executable, "-m", "observability.relay"]
        self._pending: collections.deque[ReadableSpan | SpanRecord] = (
            collections.deque()
        )
        self._dropped = 0
        self._lost = 0
        # Guards the child and its pipes.
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._respawn_at = 0.0
        self._warned_at = -WARN_EVERY_S
        self._flushes = 0
        # Set when shutdown begins, and when it has closed the child.
        self._stopped = False
        self._closed = False
        self._wake = threading.Event()
        with self._lock:
            self._live_child()
        self._thread = threading.Thread(
            target=self._hand_over_loop, name="jobledger-span-relay", daemon=True
        )
        self._thread.start()

    @property
    def child_pid(self) -> int | None:
        """The export process's id, or None while there is none."""
        child = self._child
        return None if child is None else child.pid

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        kind: type[object] = type(span)
        item: ReadableSpan | SpanRecord
        if kind is RpcSpan:
            # Only the span's values are kept: the object goes at once, so
            # the garbage collector never has to track it. This is
            # span_record, inlined.
            item = span.record() if span.plain else encode_span(span)  # type: ignore[attr-defined,arg-type]
        elif span.context.trace_flags.sampled:
            item = span
        else:
            return
        pending = self._pending
        if len(pending) >= self._max_queue_size or self._stopped:
            # After shutdown the hand-over has stopped, so a span is dropped
            # there too, and counted if a flush still comes.
            self._dropped += 1
            return
        pending.append(item)
        if len(pending) == self._batch_size:
            self._wake.set()

    def _hand_over_loop(self) -> None:
        interval = min(HAND_OVER_S, self.settings.schedule_delay_s)
        while not self._stopped:
            self._wake.wait(interval)
            self._wake.clear()
            with self._lock:
                try:
                    self._hand_over()
                except Exception:
                    # A failed hand-over must not end the thread: spans
                    # would pile up with no one to send or count them.
                    logger.exception("span hand-over failed; the next one retries")

    def _hand_over(self, timeout_s: float | None = None) -> None:
        """Send every queued span to the child, a batch per frame.

        Each write may take ``timeout_s`` (the write timeout by default).
        The caller holds the lock.
        """
        pending = self._pending
        spans = [pending.popleft() for _ in range(len(pending))]
        batch = self.settings.max_export_batch_size
        for start in range(0, len(spans), batch):
            chunk = spans[start : start + batch]
            records: list[SpanRecord] = []
            sdk_spans: list[ReadableSpan] = []
            for item in chunk:
                if type(item) is tuple or type(item) is bytes:
                    records.append(item)
                else:
                    sdk_spans.append(item)  # type: ignore[arg-type]
            payload, count = self._frame(records, sdk_spans)
            if count:
                self._send(SPANS, count, payload, timeout_s)
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY_S and not self._stopped:
            return
        dropped, self._dropped = self._dropped, 0
        lost, self._lost = self._lost, 0
        if dropped or lost:
            self._warned_at = now
        if dropped:
            logger.warning(
                "%d spans dropped: more than OTEL_BSP_MAX_QUEUE_SIZE=%d waited "
                "for the export process",
                dropped,
                self.settings.max_queue_size,
            )
        if lost:
            logger.warning("%d spans lost: no export process took them", lost)

    def _frame(
        self, records: list[SpanRecord], sdk_spans: list[ReadableSpan]
    ) -> tuple[bytes, int]:
        """Return the payload of a SPANS frame and the number of spans in it.

        A span that cannot be encoded (an attribute value marshal does not
        take, say) is dropped alone, with an error logged.
        """
        try:
            sdk = encode_spans(sdk_spans).SerializeToString() if sdk_spans else b""
        except Exception:
            logger.exception(
                "%d SDK spans could not be encoded; dropped", len(sdk_spans)
            )
            sdk, sdk_spans = b"", []
        try:
            payload = marshal.dumps((self._scope, records, sdk))
        except ValueError:
            encodable = [record for record in records if _marshals(record)]
            logger.error(
                "%d spans dropped: an attribute value is not a plain str, int, "
                "float, bool or bytes",
                len(records) - len(encodable),
            )
            records = encodable
            payload = marshal.dumps((self._scope, records, sdk))
        return payload, len(records) + len(sdk_spans)

    def _send(
        self, kind: int, number: int, payload: bytes, timeout_s: float | None = None
    ) -> subprocess.Popen[bytes] | None:
        """Write one frame to the child within ``timeout_s`` (the write timeout
        by default). Return the child, or None if none took it."""
        child = self._live_child()
        if child is None or child.stdin is None:
            if kind == SPANS:
                self._lost += number
            return None
        frame = _HEADER.pack(kind, number, len(payload)) + payload
        try:
            limit = self._write_timeout_s if timeout_s is None else timeout_s
            _write_within(child.stdin.fileno(), frame, limit)
        except (OSError, ValueError) as exc:
            logger.warning(
                "span export process %d stopped taking spans (%s)", child.pid, exc
            )
            if kind == SPANS:
                self._lost += number
            self._close_child(child)
            self._child = None
            return None
        return child

    @property
    def _write_timeout_s(self) -> float:
        # A child that takes no input for this long is stuck (stopped, or
        # hung), so it is killed and replaced rather than waited for.
        return max(WRITE_TIMEOUT_S, self.settings.export_timeout_s)

    def _live_child(self) -> subprocess.Popen[bytes] | None:
        """Return the running child, starting one if it is time.

        The caller holds the lock.
        """
        child = self._child
        if child is not None:
            status = child.poll()
            if status is None:
                return child
            logger.warning(
                "span export process %d exited with status %s", child.pid, status
            )
            self._close_child(child)
            self._child = None
        now = time.monotonic()
        if self._closed or now < self._respawn_at:
            return None
        self._respawn_at = now + RESPAWN_S
        try:
            child = subprocess.Popen(
                [*self._command, *self.settings.arguments()],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
            )
        except OSError as exc:
            logger.warning("span export process not started: %s", exc)
            return None
        assert child.stdin is not None
        os.set_blocking(child.stdin.fileno(), False)
        logger.info(
            "span export process %d sends spans to %s",
            child.pid,
            self.settings.endpoint,
        )
        self._child = child
        return child

    @staticmethod
    def _close_child(child: subprocess.Popen[bytes]) -> None:
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        if child.poll() is None:
            child.kill()
        child.wait()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export every span ended so far, within ``timeout_millis``.

        Returns False if that took too long, if no export process took the
        spans, or if the export process could not send some of them.
        """
        deadline = time.monotonic() + timeout_millis / 1000
        if not self._lock.acquire(timeout=max(0.0, timeout_millis / 1000)):
            return False
        try:
            self._hand_over(max(0.0, deadline - time.monotonic()))
            self._flushes += 1
            flush_id = self._flushes
            left = max(0.0, deadline - time.monotonic())
            child = self._send(FLUSH, flush_id, b"", left)
            if child is None:
                return False
            return self._await_flush(child, flush_id, deadline)
        finally:
            self._lock.release()

    def _await_flush(
        self, child: subprocess.Popen[bytes], flush_id: int, deadline: float
    ) -> bool:
        assert child.stdout is not None
        fd = child.stdout.fileno()
        received = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                logger.warning(
                    "span export process %d did not flush in time", child.pid
                )
                return False
            chunk = os.read(fd, 4096)
            if not chunk:
                return False
            received += chunk
            usable = len(received) - len(received) % _FLUSH_REPLY.size
            replies = [
                _FLUSH_REPLY.unpack_from(received, offset)
                for offset in range(0, usable, _FLUSH_REPLY.size)
            ]
            received = received[usable:]
            for reply_id, sent in replies:
                if reply_id >= flush_id:
                    return bool(sent)

    def shutdown(self) -> None:
        """Hand over the last spans and wait for the child to export them.

        Waits at most one export timeout and ``EXIT_GRACE_S``, then kills
        the child. A child that takes no input (stopped, or hung) adds the
        write timeout, the longer of ``WRITE_TIMEOUT_S`` and the export
        timeout, before it is killed. Safe to call twice.
        """
        if self._stopped:
            return
        self._stopped = True
        self._wake.set()
        self._thread.join()
        with self._lock:
            self._hand_over()
            self._closed = True
            child, self._child = self._child, None
            # A span that passed on_end's check as shutdown began.
            late = len(self._pending)
            self._pending.clear()
        if late:
            logger.warning("%d spans ended during shutdown; dropped", late)
        if child is None:
            return
        if child.stdin is not None:
            with contextlib.suppress(OSError):
                child.stdin.close()
        try:
            child.wait(self.settings.export_timeout_s + EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning(
                "span export process %d still exporting after %g s; killed",
                child.pid,
                self.settings.export_timeout_s + EXIT_GRACE_S,
            )
        self._close_child(child)


def _marshals(record: SpanRecord) -> bool:
    """Return whether marshal can write ``record``."""
    try:
        marshal.dumps(record)
    except ValueError:
        return False
    return True


def _write_within(fd: int, data: bytes, timeout_s: float) -> None:
    """Write all of ``data`` to the non-blocking ``fd``; raise TimeoutError
    if that takes longer than ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [fd], [], left)[1]:
                raise TimeoutError(
                    f"the pipe took no data for {timeout_s:g} s"
                ) from None


# ------------------------------------------------------------ the child


class _Inbox:
    """The frames the child has read and not yet exported, in order."""

    def __init__(self, max_queue_size: int) -> None:
        self.max_queue_size = max_queue_size
        self.items: collections.deque[tuple[int, int, bytes]] = collections.deque()
        self.queued = 0
        self.first_at = 0.0
        self.flushes = 0
        self.closed = False
        # When the input ended: the export timeout runs from then.
        self.closed_at = 0.0
        self.dropped = 0
        self.changed = threading.Condition()

    def put(self, kind: int, number: int, payload: bytes) -> None:
        with self.changed:
            if kind == SPANS:
                if self.queued + number > self.max_queue_size:
                    self.dropped += number
                    return
                if not self.queued:
                    self.first_at = time.monotonic()
                self.queued += number
            else:
                self.flushes += 1
            self.items.append((kind, number, payload))
            self.changed.notify()

    def drop(self, number: int) -> None:
        """Count ``number`` spans dropped before they reached the inbox."""
        with self.changed:
            self.dropped += number

    def close(self) -> None:
        with self.changed:
            self.closed_at = time.monotonic()
            self.closed = True
            self.changed.notify()


def _read_frames(stdin: IO[bytes], inbox: _Inbox) -> None:
    """Move frames from ``stdin`` to ``inbox`` until end of file."""
    try:
        while True:
            header = stdin.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return
            kind, number, length = _HEADER.unpack(header)
            payload = stdin.read(length) if length else b""
            if len(payload) < length or kind not in (SPANS, FLUSH):
                logger.warning("span export: a torn or unknown frame; input ends")
                return
            if kind == SPANS:
                try:
                    scope, records, sdk = marshal.loads(payload)
                    payload = encode_request(scope, records) + sdk
                except Exception:
                    logger.exception(
                        "span export: %d spans undecodable; dropped", number
                    )
                    inbox.drop(number)
                    continue
            inbox.put(kind, number, payload)
    finally:
        inbox.close()


def _next_batch(
    inbox: _Inbox, settings: ExportSettings
) -> tuple[list[tuple[int, bytes]], int | None, bool]:
    """Wait for a batch to export. Return it, the id of a flush to reply to,
    and whether the input has ended with nothing left."""
    with inbox.changed:
        while True:
            due = inbox.first_at + settings.schedule_delay_s
            if (
                inbox.queued >= settings.max_export_batch_size
                or inbox.flushes
                or inbox.closed
                or (inbox.queued and time.monotonic() >= due)
            ):
                break
            timeout = max(0.0, due - time.monotonic()) if inbox.queued else None
            inbox.changed.wait(timeout)
        batch: list[tuple[int, bytes]] = []
        size = 0
        flush_id = None
        while inbox.items:
            kind, number, payload = inbox.items[0]
            if kind == FLUSH:
                if batch:
                    break
                inbox.items.popleft()
                inbox.flushes -= 1
                flush_id = number
                break
            if batch and size + number > settings.max_export_batch_size:
                break
            inbox.items.popleft()
            batch.append((number, payload))
            size += number
        inbox.queued -= size
        if inbox.queued:
            inbox.first_at = time.monotonic()
        return batch, flush_id, inbox.closed and not inbox.items


def _export_loop(inbox: _Inbox, settings: ExportSettings, replies: IO[bytes]) -> None:
    from observability.otlp import EncodedSpans, SpanExporter

    exporter = SpanExporter(endpoint=settings.endpoint, insecure=settings.insecure)
    cutoff: threading.Timer | None = None
    # Whether every span since the last flush reply was sent.
    all_sent = True
    try:
        while True:
            batch, flush_id, finished = _next_batch(inbox, settings)
            if inbox.closed and cutoff is None:
                # The parent is gone: export what is left for at most one
                # export timeout, counted from the end of the input (not
                # from the end of an export running then), then stop the
                # exporter's retries.
                left = inbox.closed_at + settings.export_timeout_s - time.monotonic()
                cutoff = threading.Timer(max(0.0, left), exporter.shutdown)
                cutoff.daemon = True
                cutoff.start()
            if batch:
                spans = [EncodedSpans(payload, number) for number, payload in batch]
                result = exporter.export(spans)  # type: ignore[arg-type]
                if result.name != "SUCCESS":
                    all_sent = False
                    logger.warning(
                        "span export: %d spans not accepted by %s",
                        sum(number for number, _ in batch),
                        settings.endpoint,
                    )
            with inbox.changed:
                dropped, inbox.dropped = inbox.dropped, 0
            if dropped:
                all_sent = False
                logger.warning(
                    "span export: %d spans dropped, more than "
                    "OTEL_BSP_MAX_QUEUE_SIZE=%d were waiting, or undecodable",
                    dropped,
                    settings.max_queue_size,
                )
            if flush_id is not None:
                with contextlib.suppress(OSError):
                    replies.write(_FLUSH_REPLY.pack(flush_id, all_sent))
                    replies.flush()
                all_sent = True
            if finished:
                return
    finally:
        if cutoff is not None:
            cutoff.cancel()
        exporter.shutdown()


def _parse(argv: list[str] | None) -> ExportSettings:
    parser = argparse.ArgumentParser(
        prog="python -m observability.relay",
        description="Export the spans framed on stdin over OTLP/gRPC.",
    )
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--insecure", choices=("true", "false"), default="true")
    parser.add_argument("--schedule-delay-s", type=float, default=5.0)
    parser.add_argument("--max-queue-size", type=int, default=2048)
    parser.add_argument("--max-export-batch-size", type=int, default=512)
    parser.add_argument("--export-timeout-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    return ExportSettings(
        endpoint=args.endpoint,
        insecure=args.insecure == "true",
        schedule_delay_s=args.schedule_delay_s,
        max_queue_size=args.max_queue_size,
        max_export_batch_size=args.max_export_batch_size,
        export_timeout_s=args.export_timeout_s,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the export process: read frames from stdin until it closes."""
    settings = _parse(argv)
    # A Ctrl-C at a terminal reaches the whole process group, and so do
    # the SIGTERM of a service manager (systemd's KillMode=control-group),
    # of GNU timeout or of `kill -TERM -PGID`, and the SIGHUP of a closed
    # terminal. So the child ignores them, and stops after the last spans
    # when its parent closes the pipe or dies.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    # Exporting is background work: where the CPUs are busy, the process
    # that serves the RPCs goes first.
    os.nice(NICENESS)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    inbox = _Inbox(settings.max_queue_size)
    reader = threading.Thread(
        target=_read_frames, args=(sys.stdin.buffer, inbox), daemon=True
    )
    reader.start()
    _export_loop(inbox, settings, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    # Run through the module's own name, so that its log lines name
    # observability.relay rather than __main__.
    from observability.relay import main as relay_main

    sys.exit(relay_main())
