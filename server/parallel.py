"""Passes over large buffers split across the machine's cores: one core's copy moves about half of what two do.

A pass over at least SPLIT_VALUES values runs its parts on the calling thread
and on helper threads that are free at that moment; a helper busy with another
call's part is not waited for, so concurrent calls never queue behind each
other (with every core busy, each pass runs whole on its own thread).
"""

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

SPLIT_VALUES = 1 << 21  # 8 MiB of float32: below that a pass stays on one thread
ALIGN_VALUES = 1 << 16  # parts start at multiples of this (whole cache lines, whole measuring blocks)
HELPERS = max(0, min(7, (os.cpu_count() or 1) - 1))

_pool = ThreadPoolExecutor(max_workers=max(1, HELPERS), thread_name_prefix="optserve-pass")
_free = threading.BoundedSemaphore(HELPERS) if HELPERS else None


def each(size: int, part: Callable[[int, int], object]) -> list:
    """Runs `part(start, stop)` over [0, size) split into ranges, on this thread and the free helpers.

    Returns each range's result in range order; a part's exception is raised once every part is done.
    """
    helpers = 0
    if _free is not None and size >= SPLIT_VALUES:
        while helpers < HELPERS and _free.acquire(blocking=False):
            helpers += 1
    step = -(-size // (helpers + 1) // ALIGN_VALUES) * ALIGN_VALUES if helpers else size
    bounds = [(start, min(start + step, size)) for start in range(0, size, step)] if size else [(0, 0)]
    for _ in range(helpers + 1 - len(bounds)):  # fewer ranges than threads taken: give the extra back
        _free.release()
        helpers -= 1
    futures: list[Future] = [_pool.submit(_released, part, start, stop) for start, stop in bounds[1:]]
    try:
        first = part(*bounds[0])
    finally:
        results = [future.exception() or future.result() for future in futures]  # waits for every helper
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [first, *results]


def copy(target: np.ndarray, source: np.ndarray) -> None:
    """np.copyto of two flat arrays of one length, split across the free cores."""
    each(target.size, lambda start, stop: np.copyto(target[start:stop], source[start:stop]))


def _released(part: Callable[[int, int], object], start: int, stop: int) -> object:
    try:
        return part(start, stop)
    finally:
        _free.release()
