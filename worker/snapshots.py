"""The state backend: task snapshots as JSON files under the state directory.

A snapshot handle is the absolute path of the file. A task restored on
another worker reads the handle directly, so recovery across workers needs
the state directories on storage that every worker can read (as Flink's
checkpoint storage does).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from worker.durable import write_atomically

logger = logging.getLogger(__name__)


class SnapshotError(Exception):
    """A snapshot could not be written or read; the message names the handle."""


class SnapshotStore:
    """Writes, reads and discards task snapshots under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    @staticmethod
    def encode(task_id: str, checkpoint_id: int, state: dict[str, Any]) -> bytes:
        """Serialize a snapshot; raise SnapshotError when it is not JSON.

        Call it before processing goes on, because operators keep mutating
        the objects their state refers to.
        """
        try:
            return json.dumps(state, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise SnapshotError(
                f"snapshot of task {task_id} for checkpoint {checkpoint_id} "
                f"cannot be serialized: {exc}"
            ) from exc

    def write(
        self, job_id: str, task_id: str, checkpoint_id: int, data: bytes
    ) -> tuple[str, int]:
        """Store one task's snapshot durably; return its handle and size in bytes.

        Raises SnapshotError when the file cannot be written.
        """
        # NOTE: a crash during the write leaves a hidden ".chk-N.json.PID.tmp"
        # file beside the snapshot. No handle names it, and nothing deletes it.
        path = self.root / _safe(job_id) / _safe(task_id) / f"chk-{checkpoint_id}.json"
        try:
            write_atomically(path, data)
        except OSError as exc:
            raise SnapshotError(
                f"snapshot of task {task_id} for checkpoint {checkpoint_id} "
                f"failed: {exc}"
            ) from exc
        return str(path), len(data)

    def read(self, handle: str) -> dict[str, Any]:
        """Load a snapshot; raise SnapshotError when it is missing or invalid."""
        try:
            state: dict[str, Any] = json.loads(Path(handle).read_bytes())
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"snapshot {handle} cannot be read: {exc}") from exc
        return state

    def discard(self, handles: list[str]) -> int:
        """Delete the given snapshots of this store; return how many were deleted.

        Handles outside this store's directory are skipped, so a request can
        never delete another file. Safe to call twice with the same handles.
        """
        discarded = 0
        for handle in handles:
            path = Path(handle).resolve()
            if not path.is_relative_to(self.root) or path.suffix != ".json":
                logger.warning("snapshot handle %s is not in %s", handle, self.root)
                continue
            try:
                path.unlink()
                discarded += 1
            except FileNotFoundError:
                continue
        return discarded


def _safe(name: str) -> str:
    # Job and vertex ids must not escape the directory; the coordinator
    # already rejects "/" in vertex ids.
    return name.replace("/", "_").replace("..", "_")
