"""Sinks: a print sink and an exactly-once file sink.

The file sink is a two-phase commit. Between barriers it stages records in
memory. At the barrier of checkpoint N it writes them to a staged file
(pre-commit, fsynced) and records N as pending in its snapshot. When N
completes, every pending transaction up to N is committed. A commit log
beside the output file makes a commit idempotent: it records, per committed
checkpoint, the length of the output after that commit. A commit that a
crash interrupted is redone from the length the log records before it.

After a recovery from checkpoint N, the pending transactions of N's
snapshot are committed, because N completed. Staged transactions newer than
N are deleted. The output is cut back to what N's commits produced, so the
replayed records are written once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from worker.durable import fsync_directory, remove_temporaries, write_atomically
from worker.operators.base import (
    ConfigError,
    Operator,
    OperatorContext,
    Output,
    key_selector,
    optional,
    required,
)
from worker.records import Record, key_text

logger = logging.getLogger(__name__)

# The transaction of the records after the last barrier, committed when the
# input ends; no checkpoint id reaches it.
FINAL_TRANSACTION = 2**62


class PrintSink(Operator):
    """Writes each value as a JSON line to standard output.

    Configuration: ``prefix`` (default: the task id and "> ").
    """

    def __init__(self, config: dict[str, Any], context: OperatorContext) -> None:
        super().__init__(config, context)
        self.prefix = optional(config, "prefix", str, f"{context.task_id}> ")

    def process(self, record: Record, output: Output) -> None:
        print(self.prefix + json.dumps(record.value), file=sys.stdout, flush=True)


class FileSink(Operator):
    """Writes JSON lines to a file, once per record across job failovers.

    Configuration: ``path`` (may contain ``{subtask}``, which is required when
    the parallelism is above 1), ``mode`` ("append", the default, or
    "upsert"), and for upsert ``key`` (a field or module:function). Upsert
    keeps the latest value per key and rewrites the whole file, sorted by
    key, at each commit.
    """

    def __init__(self, config: dict[str, Any], context: OperatorContext) -> None:
        super().__init__(config, context)
        template: str = required(config, "path", str)
        if context.parallelism > 1 and "{subtask}" not in template:
            raise ConfigError(
                f"path {template!r} needs {{subtask}} for a sink of parallelism "
                f"{context.parallelism}, so that subtasks write separate files"
            )
        self.path = Path(template.replace("{subtask}", str(context.subtask_index)))
        self.mode: str = optional(config, "mode", str, "append")
        if self.mode not in ("append", "upsert"):
            raise ConfigError(f"mode {self.mode!r} is unknown; give append or upsert")
        spec = optional(config, "key", str, "") or context.input_key_selector
        self.key_of = key_selector(spec, "key") if self.mode == "upsert" else None
        self.staging = self.path.with_name(self.path.name + ".staging")
        self.commit_log = self.path.with_name(self.path.name + ".commits.json")
        self.buffer: list[Any] = []
        self.table: dict[str, tuple[Any, Any]] = {}
        self.pending: list[int] = []

    def open(self) -> None:
        self.staging.mkdir(parents=True, exist_ok=True)

    def process(self, record: Record, output: Output) -> None:
        if self.key_of is not None:
            key = self.key_of(record.value)
            self.table[key_text(key)] = (key, record.value)
        else:
            self.buffer.append(record.value)

    # -------------------------------------------------------- phase one

    def snapshot_state(self, checkpoint_id: int) -> Any:
        self._stage(checkpoint_id)
        self.pending.append(checkpoint_id)
        state: dict[str, Any] = {"pending": list(self.pending)}
        if self.key_of is not None:
            state["table"] = [[key, value] for key, value in self.table.values()]
        return state

    def _stage(self, transaction: int) -> None:
        """Write the records since the last barrier to a durable staged file."""
        if self.key_of is not None:
            ordered = sorted(self.table.values(), key=lambda kv: json.dumps(kv[0]))
            lines = [value for _, value in ordered]
        else:
            lines = self.buffer
        data = "".join(json.dumps(value) + "\n" for value in lines).encode()
        write_atomically(self._staged(transaction), data)
        # Cleared only once staged, so that a failed staging keeps the records
        # for the next checkpoint.
        self.buffer = []

    def _staged(self, transaction: int) -> Path:
        return self.staging / f"{transaction}.jsonl"

    # -------------------------------------------------------- phase two

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        due = [t for t in self.pending if t <= checkpoint_id]
        for transaction in due:
            self._commit(transaction)
        self.pending = [t for t in self.pending if t > checkpoint_id]

    def finish(self, output: Output) -> None:
        # NOTE: no checkpoint can follow the end of input (the coordinator
        # checkpoints only jobs whose tasks all run), so the tail is committed
        # now. A later recovery from an earlier checkpoint cuts it off again.
        self._stage(FINAL_TRANSACTION)
        for transaction in [*self.pending, FINAL_TRANSACTION]:
            self._commit(transaction)
        self.pending = []

    def _commit(self, transaction: int) -> None:
        """Publish one staged transaction; a repeated commit does nothing."""
        commits = self._read_log()
        if any(entry[0] >= transaction for entry in commits):
            return
        staged = self._staged(transaction)
        if not staged.exists():
            raise RuntimeError(
                f"staged transaction {transaction} of sink {self.context.task_id} "
                f"is missing from {self.staging}"
            )
        length = self._publish(staged.read_bytes(), commits[-1][1] if commits else 0)
        self._write_log([*commits, [transaction, length]])
        staged.unlink()
        logger.debug(
            "sink %s committed transaction %d", self.context.task_id, transaction
        )

    def _publish(self, data: bytes, committed_length: int) -> int:
        """Write ``data`` after the committed output; return the new length."""
        if self.key_of is not None:
            write_atomically(self.path, data)
            return len(data)
        mode = "r+b" if self.path.exists() else "wb"
        with self.path.open(mode) as file:
            # Cut off what an interrupted commit appended before it crashed.
            file.truncate(committed_length)
            file.seek(committed_length)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        return committed_length + len(data)

    def _read_log(self) -> list[list[int]]:
        if not self.commit_log.exists():
            return []
        entries: list[list[int]] = json.loads(self.commit_log.read_bytes())
        return entries

    def _write_log(self, entries: list[list[int]]) -> None:
        write_atomically(self.commit_log, json.dumps(entries).encode())

    # -------------------------------------------------------- recovery

    def restore_state(self, state: Any) -> None:
        self.pending = list(state["pending"])
        if self.key_of is not None:
            self.table = {key_text(k): (k, v) for k, v in state.get("table", [])}

    def recover(self, checkpoint_id: int) -> None:
        """Finish the commits of checkpoint ``checkpoint_id`` and drop newer work.

        Called after ``restore_state`` (or with nothing restored, with 0) and
        before the first record.
        """
        self.staging.mkdir(parents=True, exist_ok=True)
        # Writes that a crash interrupted left temporary files behind.
        for target in (self.path, self.commit_log, self.staging / "*"):
            remove_temporaries(target)
        for transaction in self.pending:
            if transaction <= checkpoint_id:
                self._commit(transaction)
        self.pending = []
        for staged in self.staging.glob("*.jsonl"):
            if int(staged.stem) > checkpoint_id:
                staged.unlink()
        self._rewind(checkpoint_id)

    def _rewind(self, checkpoint_id: int) -> None:
        # NOTE: readers may have seen the output that is cut here (the tail
        # committed at the end of input, or commits after an older restore
        # point). An attempt left running on an unreachable worker could also
        # still commit; nothing fences the file against it.
        commits = self._read_log()
        kept = [entry for entry in commits if entry[0] <= checkpoint_id]
        if kept == commits:
            return
        length = kept[-1][1] if kept else 0
        if self.key_of is not None:
            ordered = sorted(self.table.values(), key=lambda kv: json.dumps(kv[0]))
            data = "".join(json.dumps(v) + "\n" for _, v in ordered).encode()
            write_atomically(self.path, data if kept else b"")
        elif self.path.exists():
            with self.path.open("r+b") as file:
                file.truncate(length)
                os.fsync(file.fileno())
        self._write_log(kept)
        fsync_directory(self.path.parent)
        logger.info(
            "sink %s cut its output back to checkpoint %d",
            self.context.task_id,
            checkpoint_id,
        )
