"""Passes split across cores: every value once, errors after every part, and no call waits for a busy helper."""

import threading
import time

import numpy as np
import pytest

from optserve.server import parallel


SIZES = [0, 1, parallel.SPLIT_VALUES - 1, parallel.SPLIT_VALUES, 3 * parallel.SPLIT_VALUES + 5]


@pytest.mark.parametrize("size", SIZES)
def test_a_split_pass_covers_every_value_once_in_order(size: int) -> None:
    ranges = parallel.each(size, lambda start, stop: (start, stop))
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in order, no overlap
    assert all(start % parallel.ALIGN_VALUES == 0 for start, _ in ranges)
    source = np.arange(size, dtype=np.float32)
    target = np.full(size, -1.0, np.float32)
    parallel.copy(target, source)
    assert target.tobytes() == source.tobytes()


def test_a_failing_part_raises_after_every_part_has_finished() -> None:
    finished = []

    def part(start: int, stop: int) -> None:
        if start:
            raise ValueError("part failed")
        time.sleep(0.05)
        finished.append(start)

    if parallel.HELPERS == 0:
        pytest.skip("one core: a pass is never split")
    with pytest.raises(ValueError, match="part failed"):
        parallel.each(2 * parallel.SPLIT_VALUES, part)
    assert finished == [0]  # the calling thread's part ran to its end before the error was raised


def test_a_pass_runs_alone_when_every_helper_is_busy() -> None:
    """A busy helper is not waited for: the second pass runs whole on its own thread, then the first ends."""
    if parallel.HELPERS == 0:
        pytest.skip("one core: a pass is never split")
    release, started = threading.Event(), threading.Event()

    def slow(start: int, stop: int) -> None:
        if start:
            started.set()
            assert release.wait(10)

    first = threading.Thread(target=parallel.each, args=(2 * parallel.SPLIT_VALUES * parallel.HELPERS, slow))
    first.start()
    try:
        assert started.wait(10)
        ranges = parallel.each(4 * parallel.SPLIT_VALUES, lambda start, stop: (start, stop))
        assert ranges == [(0, 4 * parallel.SPLIT_VALUES)]  # not split: no helper was free
    finally:
        release.set()
        first.join(10)
    assert not first.is_alive()
