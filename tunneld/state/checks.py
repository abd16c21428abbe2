# -*- test-case-name: tests.test_state -*-
"""
Argument checks both backends make, so they refuse the same calls.

These are programming errors (the caller passed nonsense), raised as
L{ValueError} at once rather than stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MAX_KEY_LENGTH = 1024


def check_key(what: str, value: str) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_LENGTH:
        raise ValueError(f"{what} must be a non-empty string of at most {MAX_KEY_LENGTH}: {value!r}")


def check_keys(what: str, values: Sequence[str]) -> None:
    for value in values:
        check_key(what, value)


def check_namespace(namespace: str) -> None:
    check_key("namespace", namespace)
    if ":" in namespace:
        raise ValueError(f"a namespace has no ':': {namespace!r}")


def check_ttl(ttl: float) -> None:
    if not (isinstance(ttl, (int, float)) and math.isfinite(ttl) and ttl > 0):
        raise ValueError(f"a ttl is a positive number of seconds: {ttl!r}")


def check_bucket(cost: float, rate: float, burst: float) -> None:
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"a bucket's rate must be positive: {rate!r}")
    if not (0 < cost <= burst and math.isfinite(burst)):
        raise ValueError(f"a take needs 0 < cost <= burst: cost {cost!r}, burst {burst!r}")


def ttl_ms(ttl: float) -> int:
    """Whole milliseconds, at least 1."""
    return max(1, math.ceil(ttl * 1000))


def log_position(after: str | None) -> int | None:
    """
    How many entries of a log a reader has seen: 0 for None (from the start),
    the number an event id names, or None for text no log issued.
    """
    if after is None:
        return 0
    if not after.isdigit() or len(after) > 18:
        return None
    return int(after)
