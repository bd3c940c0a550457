"""Units, timing and target records shared by every section of the bench."""

import time
from collections.abc import Callable
from typing import Any

MB = 1_000_000
BYTES_PER_PARAM = 28  # one Adam step reads param, m, v, grad (16 bytes) and writes param, m, v (12 bytes)
CLIENT_TIMEOUT = 600.0


def time_once(fn: Callable[[], Any]) -> float:
    """Seconds one call of `fn` takes, by the wall clock a caller sees."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def time_reps(fn: Callable[[], Any], reps: int) -> list[float]:
    """Seconds of `reps` consecutive calls of `fn`, one figure per call, for medians and minima."""
    return [time_once(fn) for _ in range(reps)]


def make_target(section: str, name: str, value: float, op: str, limit: float, unit: str = "x") -> dict:
    """A target as a plain record, met or not, so every target is reported and none is asserted."""
    met = value <= limit if op == "<=" else value >= limit
    return {"section": section, "name": name, "value": value, "op": op, "limit": limit, "unit": unit,
            "met": bool(met)}
