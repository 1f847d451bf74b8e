"""A task's outputs: partitioning records among downstream subtasks, batching."""

from __future__ import annotations

import collections
import zlib
from collections.abc import Callable
from typing import Any

from protos import jobmanager_internal_pb2 as fpb
from worker.exchange import Sender
from worker.records import Barrier, Element, Record, Watermark, key_text

# Records per message between workers. Each ExchangeData message costs tens
# of microseconds in grpc.aio whatever its size, so the batch must be large
# for small records: bench.exchange measured about 300,000 records per second
# with 64 and about 550,000 with 256 on 2 cores.
# NOTE: the limit counts records, not bytes, so a channel's 16 buffers can
# hold 16 * 256 large records.
DEFAULT_BATCH_SIZE = 256


def key_hash(key: Any) -> int:
    """Return a hash of a key that is the same in every process.

    Python's ``hash`` of a str differs between processes, and every worker
    must send a key to the same downstream subtask.
    """
    return zlib.crc32(key_text(key).encode())


class OutputEdge:
    """The subtasks of one downstream vertex and how records reach them."""

    def __init__(
        self,
        vertex_id: str,
        shuffle_mode: int,
        senders: dict[int, Sender],
        key_of: Callable[[Any], Any] | None,
        parallelism: int,
    ) -> None:
        self.vertex_id = vertex_id
        self.shuffle_mode = shuffle_mode
        self.senders = senders
        self.key_of = key_of
        self.parallelism = parallelism
        self._ordered = [senders[i] for i in sorted(senders)]
        self._next = 0

    def route(self, record: Record) -> list[Sender]:
        """Return the senders a record goes to.

        NOTE: records are not copied. In-process channels and BROADCAST
        edges hand the same value object to several operators, so a user
        function that changes its input in place changes it for all of them.
        """
        if self.shuffle_mode == fpb.HASH and self.key_of is not None:
            index = key_hash(self.key_of(record.value)) % self.parallelism
            return [self.senders[index]]
        if self.shuffle_mode == fpb.BROADCAST:
            return self._ordered
        if self.shuffle_mode == fpb.RESCALE or len(self._ordered) > 1:
            sender = self._ordered[self._next % len(self._ordered)]
            self._next += 1
            return [sender]
        return self._ordered


class RecordWriter:
    """The last output of a task's chain: queues buffers per sender.

    ``emit`` only queues; ``flush`` sends and waits for credits, so the task
    loop decides when to block. The queue per sender stays within one
    batch beyond what a single input element produces.
    """

    def __init__(
        self, edges: list[OutputEdge], batch_size: int = DEFAULT_BATCH_SIZE
    ) -> None:
        self.edges = edges
        self.batch_size = batch_size
        self.records_out = 0
        # Whether some sender has a complete batch waiting; kept as a flag
        # because the task loop checks it after every record.
        self._full = False
        self._outbox: dict[Sender, collections.deque[list[Element]]] = {
            sender: collections.deque()
            for edge in edges
            for sender in edge.senders.values()
        }

    @property
    def senders(self) -> list[Sender]:
        return list(self._outbox)

    def emit(self, record: Record) -> None:
        self.records_out += 1
        for edge in self.edges:
            for sender in edge.route(record):
                self._append(sender, record)

    def emit_watermark(self, timestamp: int) -> None:
        self.broadcast(Watermark(timestamp))

    def broadcast(self, element: Watermark | Barrier) -> None:
        """Queue a watermark or barrier for every downstream subtask."""
        for queue in self._outbox.values():
            queue.append([element])
            if len(queue) > 1:
                self._full = True

    def _append(self, sender: Sender, record: Record) -> None:
        queue = self._outbox[sender]
        last = queue[-1] if queue else None
        if (
            last is not None
            and isinstance(last[0], Record)
            and len(last) < self.batch_size
        ):
            last.append(record)
            if len(last) >= self.batch_size:
                self._full = True
        else:
            queue.append([record])
            if len(queue) > 1 or self.batch_size <= 1:
                self._full = True

    def has_full_batch(self) -> bool:
        """Tell whether some sender has a complete batch waiting."""
        return self._full

    async def flush(self) -> None:
        """Send everything queued; returns once every buffer had a credit."""
        for sender, queue in self._outbox.items():
            while queue:
                await sender.send(queue[0])
                queue.popleft()
        self._full = False
