"""Log lines that name the trace and span they were written in."""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s%(trace_ids)s: %(message)s"


class TraceIdFilter(logging.Filter):
    """Sets ``trace_ids`` on each record: `` trace_id=... span_id=...`` while
    a recording span is current, "" otherwise. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_ids = (
                f" trace_id={context.trace_id:032x} span_id={context.span_id:016x}"
            )
        else:
            record.trace_ids = ""
        return True


def configure_logging(level: str | int) -> None:
    """Log to standard error at ``level``, with trace ids where a span is active."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
