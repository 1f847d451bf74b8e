"""Calls from the command line to a coordinator, following the leader.

The client is given one or more coordinator addresses and tries them in
order. A standby rejects a call with UNAVAILABLE and the leader's address in
the ``jobledger-leader`` trailing metadata entry, and the client follows
that address once. Every failure becomes a `CliError` with a one-line
message and the exit status of its kind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from coordinator.servicers import LEADER_METADATA_KEY

logger = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

DEFAULT_COORDINATOR = "127.0.0.1:6123"
# The RPCs that change state, as opposed to queries.
_CHANGING_METHODS = frozenset(
    {"SubmitJob", "RequestCheckpoint", "RequestRecovery", "CancelJob"}
)


class CliError(Exception):
    """A command that failed; ``message`` is one line naming what to do."""

    def __init__(self, message: str, exit_status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def parse_addresses(text: str) -> list[str]:
    """Split ``HOST:PORT[,HOST:PORT...]``; raise ValueError on a bad entry."""
    addresses = [part.strip() for part in text.split(",") if part.strip()]
    if not addresses:
        raise ValueError("give at least one coordinator as HOST:PORT")
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"{address!r} is not HOST:PORT with a port from 1 to 65535"
            )
    return addresses


class CoordinatorClient:
    """Unary calls to the leading coordinator among ``addresses``.

    Use as a context manager; the channels are closed on exit.
    """

    def __init__(self, addresses: Sequence[str], timeout_s: float) -> None:
        self._addresses = list(addresses)
        self._timeout_s = timeout_s
        self._channels: dict[str, grpc.Channel] = {}

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def call(
        self, stub_type: Callable[[grpc.Channel], Any], method: str, request: Any
    ) -> Any:
        """Call ``method`` of the stub built by ``stub_type`` on the leader.

        Raises CliError: EXIT_FAILED when the coordinator rejects the
        request, EXIT_UNREACHABLE when no address leads or responds.
        """
        pending = list(self._addresses)
        followed = False
        failures: list[str] = []
        while pending:
            address = pending.pop(0)
            stub = stub_type(self._channel(address))
            try:
                return getattr(stub, method)(request, timeout=self._timeout_s)
            except grpc.RpcError as exc:
                leader = self._check_retryable(exc, address, method)
                failures.append(f"{address}: {_short_details(exc)}")
                if leader and not followed and leader != address:
                    logger.debug(
                        "%s: following leader %s from %s", method, leader, address
                    )
                    followed = True
                    if leader in pending:
                        pending.remove(leader)
                    pending.insert(0, leader)
        raise CliError(
            f"no leading coordinator reachable ({'; '.join(failures)}); start one "
            "with `jobledger coordinator --db PATH` or pass its address with "
            "--coordinator HOST:PORT",
            EXIT_UNREACHABLE,
        )

    def _channel(self, address: str) -> grpc.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.insecure_channel(address)
            self._channels[address] = channel
        return channel

    def _check_retryable(self, exc: grpc.RpcError, address: str, method: str) -> str:
        """Return the leader address a standby named, or "" for another
        UNAVAILABLE; raise CliError for every other status."""
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return _leader_address(exc)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            # A change may have been applied, so no request is sent again.
            effect = (
                ", so it may or may not have taken effect; check with `jobledger jobs`"
                if method in _CHANGING_METHODS
                else f"; check that {address} is a jobledger coordinator"
            )
            raise CliError(
                f"{method} on {address} got no reply within {self._timeout_s:g} s"
                f"{effect}, or raise --timeout",
                EXIT_UNREACHABLE,
            ) from None
        raise CliError(f"{exc.details()} ({code.name} from {address})") from None


def _leader_address(exc: grpc.RpcError) -> str:
    metadata = exc.trailing_metadata() or ()
    for key, value in metadata:
        if key == LEADER_METADATA_KEY:
            return str(value)
    return ""


def _short_details(exc: grpc.RpcError) -> str:
    details = str(exc.details() or exc.code().name)
    if "Connection refused" in details:
        return "connection refused"
    return " ".join(details.split())
