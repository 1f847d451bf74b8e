"""User functions that test jobs name as ``module:function``."""

from __future__ import annotations

import time
from typing import Any


def double_amount(value: dict[str, Any]) -> dict[str, Any]:
    return {**value, "amount": value["amount"] * 2}


def is_even_amount(value: dict[str, Any]) -> bool:
    return bool(value["amount"] % 2 == 0)


def split_words(value: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"word": word, "ts": value.get("ts")} for word in value["text"].split()]


def user_key(value: dict[str, Any]) -> str:
    return str(value["user"]).upper()


def product(accumulator: Any, value: Any) -> Any:
    return value if accumulator is None else accumulator * value


def as_set(accumulator: Any, value: Any) -> Any:
    """Aggregate into a set, which no snapshot can serialize as JSON."""
    return {value} if accumulator is None else accumulator | {value}


def reject(value: Any) -> bool:
    return False


def slow_identity(value: Any) -> Any:
    """Return the value after 0.1 ms, as a sink slower than its source does.

    It blocks the event loop on purpose: the worker runs operators inline.
    """
    time.sleep(0.0001)
    return value


def user_and_parity(value: dict[str, Any]) -> tuple[str, int]:
    """Return a composite key, a tuple, which JSON turns into a list."""
    return (value["user"], value["amount"] % 2)


def k_and_zero(value: dict[str, Any]) -> tuple[Any, int]:
    return (value["k"], 0)
