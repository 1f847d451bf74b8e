"""The Jaeger of the tracing tests: built when missing, skipped without Go.

``jaeger_binary`` builds ``tools/bin/jaeger`` when Go is on PATH and it is
missing, and skips the test when Go is missing (fails it under CI, where Go
must be present).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.jaeger import JAEGER, JAEGER_MODULE, Jaeger, service_of, tags

__all__ = ["Jaeger", "jaeger_binary", "service_of", "tags"]


def jaeger_binary() -> Path:
    """Return the Jaeger binary, building it first if Go can; else skip."""
    if JAEGER.exists():
        return JAEGER
    go = shutil.which("go")
    if go is None:
        reason = "Go is not on PATH, so Jaeger (tools/jaeger) cannot be built"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must have Go")
        pytest.skip(reason)
    subprocess.run(
        [go, "build", "-o", str(JAEGER), "github.com/jaegertracing/jaeger/cmd/jaeger"],
        cwd=JAEGER_MODULE,
        check=True,
        timeout=1800,
    )
    return JAEGER
