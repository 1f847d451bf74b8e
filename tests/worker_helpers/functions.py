"""User functions that test jobs name as ``module:function``."""

from __future__ import annotations

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
