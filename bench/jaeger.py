"""A real Jaeger (v2, in-memory storage) on 127.0.0.1, for benchmarks and tests.

The binary is built from the Go module pinned in ``tools/jaeger`` by
``make jaeger`` into ``tools/bin/jaeger``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
JAEGER = REPO_ROOT / "tools" / "bin" / "jaeger"
JAEGER_MODULE = REPO_ROOT / "tools" / "jaeger"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that no socket is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# Every port Jaeger opens is listed here, on 127.0.0.1: OTLP over gRPC in,
# the query API (HTTP and gRPC) out. Its own metrics are off, so it opens
# no telemetry port.
CONFIG = """\
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
  jaeger_query:
    storage:
      traces: memstore
    enable_tracing: false
    http:
      endpoint: 127.0.0.1:{query_http}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp_grpc}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""


class Jaeger:
    """One Jaeger process; ``otlp_endpoint`` receives, ``traces`` reads back."""

    def __init__(self, work_dir: Path, binary: Path = JAEGER) -> None:
        self.work_dir = work_dir
        self.binary = binary
        self.otlp_port = free_port()
        self.query_port = free_port()
        self.process: asyncio.subprocess.Process | None = None
        self.log_path = work_dir / "jaeger.log"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("jaeger was never started")
        return self.process.pid

    @property
    def otlp_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.otlp_port}"

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start Jaeger and return once its query API responds."""
        config = self.work_dir / "jaeger.yaml"
        config.write_text(
            CONFIG.format(
                otlp_grpc=self.otlp_port,
                query_http=self.query_port,
                query_grpc=free_port(),
            )
        )
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                str(self.binary),
                "--config",
                str(config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.returncode is not None:
                raise RuntimeError(f"jaeger exited: {self.log_path.read_text()}")
            try:
                await self._get("/api/services")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.1)

    async def _get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.query_port}{path}"

        def fetch() -> Any:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.load(response)

        return await asyncio.to_thread(fetch)

    async def traces(self, service: str) -> list[dict[str, Any]]:
        """Return the newest 10,000 stored traces with a span of ``service``."""
        document = await self._get(
            f"/api/traces?service={service}&limit=10000&lookback=1h"
        )
        return list(document.get("data") or [])

    async def trace_count(self, service: str, operation: str) -> int:
        """Return the number of stored traces with a span ``operation`` of
        ``service``, up to 10,000."""
        document = await self._get(
            f"/api/traces?service={service}&operation={operation}"
            "&limit=10000&lookback=1h"
        )
        return len(document.get("data") or [])

    async def stop(self) -> None:
        """Kill Jaeger. Safe to call twice."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


def tags(span: dict[str, Any]) -> dict[str, Any]:
    """Return a Jaeger span's tags as a dict."""
    return {tag["key"]: tag["value"] for tag in span.get("tags", [])}


def service_of(trace: dict[str, Any], span: dict[str, Any]) -> str:
    """Return the service name of the process that emitted ``span``."""
    return str(trace["processes"][span["processID"]]["serviceName"])
