"""Epoch fencing of coordinator calls.

Every call from a coordinator carries the leader's epoch in the
``jobledger-leader-epoch`` metadata entry. The worker remembers the highest
epoch it has seen and rejects a lower one with FAILED_PRECONDITION, so a
deposed leader that wakes up late cannot deploy, trigger or cancel. Calls
without the entry (data exchange between workers) are not fenced.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

logger = logging.getLogger(__name__)

EPOCH_METADATA_KEY = "jobledger-leader-epoch"


class EpochFence(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """A server interceptor that rejects calls of a lower epoch than seen."""

    def __init__(self) -> None:
        self.highest = 0

    def observe(self, epoch: int) -> None:
        """Raise the highest epoch seen, e.g. from a registration's reply."""
        self.highest = max(self.highest, epoch)

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        metadata = dict(handler_call_details.invocation_metadata or ())
        text = metadata.get(EPOCH_METADATA_KEY)
        if text is None:
            return await continuation(handler_call_details)
        try:
            epoch = int(text)
        except ValueError:
            return _rejection(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{EPOCH_METADATA_KEY} {text!r} is not an integer",
            )
        if epoch < self.highest:
            logger.warning(
                "rejected %s of epoch %d: epoch %d was seen",
                handler_call_details.method,
                epoch,
                self.highest,
            )
            return _rejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"epoch {epoch} is stale: this worker has seen leader epoch "
                f"{self.highest}",
            )
        self.highest = epoch
        return await continuation(handler_call_details)


def _rejection(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    return grpc.unary_unary_rpc_method_handler(reject)
