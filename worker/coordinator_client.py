"""Calls from the worker to the coordinator, following the leader.

The worker is given every coordinator's address. A standby rejects a call
with UNAVAILABLE and puts the leader's address in the ``jobledger-leader``
trailing metadata entry, and the client moves to that address. When a
coordinator is unreachable, the client tries the next address of the list.
Retries back off exponentially with jitter.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    stop_never,
    wait_exponential_jitter,
)

import observability
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2_grpc as fpb_grpc

logger = logging.getLogger(__name__)

LEADER_METADATA_KEY = "jobledger-leader"

_RETRIED = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

Reply = TypeVar("Reply")


def _retried(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _RETRIED


def leader_hint(exc: grpc.aio.AioRpcError) -> str:
    """Return the leader address a standby put in its trailing metadata, or ""."""
    for key, value in exc.trailing_metadata() or ():
        if key == LEADER_METADATA_KEY and isinstance(value, str):
            return value
    return ""


class Stubs:
    """The coordinator services on one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.registration = fpb_grpc.TaskManagerRegistrationStub(channel)
        self.internal = fpb_grpc.JobManagerInternalServiceStub(channel)
        self.reporting = svc_grpc.TaskReportingStub(channel)


class CoordinatorClient:
    """Makes calls to whichever coordinator leads. Not safe across event loops."""

    def __init__(
        self, addresses: list[str], call_timeout_s: float = 5.0, max_wait_s: float = 1.0
    ) -> None:
        if not addresses:
            raise ValueError("no coordinator address given")
        self.addresses = list(addresses)
        self.current = self.addresses[0]
        self.call_timeout_s = call_timeout_s
        self.max_wait_s = max_wait_s
        # The address tried before ``current``, so that two standbys naming
        # each other with stale hints are retried with backoff, not at once.
        self._previous = ""
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stubs(self) -> Stubs:
        channel = self._channels.get(self.current)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                self.current, interceptors=observability.client_interceptors()
            )
            self._channels[self.current] = channel
        return Stubs(channel)

    def _move_on(self, exc: grpc.aio.AioRpcError) -> None:
        """Pick the coordinator to try next after a retried failure."""
        hint = leader_hint(exc)
        self._previous = self.current
        if hint and hint != self.current:
            logger.info("coordinator %s names %s as leader", self.current, hint)
            self.current = hint
            return
        if self.current in self.addresses:
            index = self.addresses.index(self.current)
            self.current = self.addresses[(index + 1) % len(self.addresses)]
        else:
            self.current = self.addresses[0]

    async def call(
        self,
        name: str,
        invoke: Callable[[Stubs, float], Awaitable[Reply]],
        give_up_after_s: float | None = None,
    ) -> Reply:
        """Call ``invoke`` on the leader, retrying transient failures.

        Retries until ``give_up_after_s`` seconds have passed (forever when
        None) and then raises the last AioRpcError; any other status is
        raised at once.
        """
        stop: Any = (
            stop_never if give_up_after_s is None else stop_after_delay(give_up_after_s)
        )
        backoff = wait_exponential_jitter(
            multiplier=0.05, max=self.max_wait_s, jitter=0.1
        )
        retrying = AsyncRetrying(
            stop=stop,
            wait=lambda state: self._wait_before_retry(state, backoff),
            retry=retry_if_exception(_retried),
            before_sleep=lambda state: self._before_retry(name, state),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await invoke(self._stubs(), self.call_timeout_s)
        raise AssertionError("tenacity ended without a result")

    def _wait_before_retry(self, state: Any, backoff: Callable[[Any], float]) -> float:
        """Return no wait to follow a new leader hint, else the backoff.

        A standby's hint can lag a takeover by one lease poll, so the worker
        follows each fresh hint at once instead of letting the backoff grow
        past the heartbeat timeout while coordinators change.
        """
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, grpc.aio.AioRpcError):
            hint = leader_hint(exc)
            if hint and hint not in (self.current, self._previous):
                return 0.0
        return backoff(state)

    def _before_retry(self, name: str, state: Any) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, grpc.aio.AioRpcError):
            logger.debug(
                "%s to coordinator %s failed (%s), retry %d",
                name,
                self.current,
                exc.code().name,
                state.attempt_number,
            )
            self._move_on(exc)

    async def close(self) -> None:
        """Close every channel. Safe to call twice."""
        channels = list(self._channels.values())
        self._channels.clear()
        for channel in channels:
            await channel.close()
