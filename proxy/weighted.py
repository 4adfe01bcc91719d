"""Weighted random choice, shared by the stages that load-balance (routing, credentials)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def weighted_choice(items: Sequence[T], weights: Sequence[float], rand: Callable[[], float] = random.random) -> T:
    """One of `items` at random in proportion to its weight (all weights > 0)."""
    if len(items) == 1:
        return items[0]
    point = rand() * sum(weights)
    for item, weight in zip(items, weights, strict=True):
        point -= weight
        if point < 0:
            return item
    return items[-1]
