"""The ``jobledger`` command's entry point.

The OpenTelemetry SDK reads some of its variables when it is imported,
and raises on an invalid one before the command line can report it. So
those are checked here first, without importing the SDK, and an invalid
one stops the command with one line naming it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

# The SDK's span limits: whole numbers of 0 or more, or empty for no limit.
LIMIT_VARIABLES = (
    "OTEL_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_EVENT_COUNT_LIMIT",
    "OTEL_SPAN_LINK_COUNT_LIMIT",
    "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT",
)


def invalid_limit(environ: Mapping[str, str]) -> str | None:
    """Return a one-line message about the first invalid span limit, or None."""
    for name in LIMIT_VARIABLES:
        if name not in environ:
            continue
        text = environ[name].strip()
        if not text:
            continue
        try:
            if int(text) >= 0:
                continue
        except ValueError:
            pass
        return (
            f"{name}={environ[name]!r} is not a whole number of 0 or more; "
            "fix it, or set it empty for no limit"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Check the variables the SDK reads on import, then run the command line."""
    problem = invalid_limit(os.environ)
    if problem is not None:
        print(f"jobledger: {problem}", file=sys.stderr)
        return 2
    from coordinator.cli import main as cli_main

    return cli_main(argv)
