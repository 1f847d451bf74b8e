"""Durable file writes: write, fsync, rename, fsync the directory."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new.

    Returns once the file and its directory entry are on stable storage.
    """
    make_directories(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries, so that a rename in it survives a crash."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_directories(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each durably.

    A new directory's entry lives in its parent, so each parent is fsynced
    too; otherwise a crash could lose the directory of a file that was
    fsynced and acknowledged.
    """
    missing = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        fsync_directory(new.parent)


def remove_temporaries(path: Path) -> int:
    """Delete what interrupted ``write_atomically`` calls left of ``path``.

    Only call it while no other process writes ``path``. Returns how many
    temporary files were deleted.
    """
    removed = 0
    for temporary in path.parent.glob(f".{path.name}.*.tmp"):
        temporary.unlink(missing_ok=True)
        removed += 1
    return removed
