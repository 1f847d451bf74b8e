"""Domain errors: expected rejections of a command, each one gRPC status.

A rejected command writes no event.
"""

from __future__ import annotations

import grpc


class CommandRejected(Exception):
    """Base of the expected rejections; ``code`` is the gRPC status sent."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CommandRejected):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CommandRejected):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(CommandRejected):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(CommandRejected):
    code = grpc.StatusCode.ALREADY_EXISTS


class NotLeader(Exception):
    """This coordinator does not lead; ``leader_address`` may name the one that does."""

    def __init__(self, leader_address: str) -> None:
        hint = f"; the leader is at {leader_address}" if leader_address else ""
        super().__init__(f"this coordinator is not the leader{hint}")
        self.leader_address = leader_address


class ReplayError(Exception):
    """An event of the log could not be applied; startup stops here."""

    def __init__(self, seq: int, event_type: str, reason: str) -> None:
        super().__init__(f"replay failed at event seq {seq} ({event_type}): {reason}")
        self.seq = seq
        self.event_type = event_type
