"""How busy an optimizer is: its accepted pushes per second recently, and the age of the last one."""

import time
from collections import deque

WINDOW = 10.0  # seconds over which pushes per second are counted


class PushRate:
    """The monotonic times of the last `capacity` accepted pushes; not thread-safe (the optimizer's lock guards it)."""

    def __init__(self, capacity: int = 1024, clock=time.monotonic):
        self._times: deque[float] = deque(maxlen=capacity)
        self._clock = clock

    def accepted(self) -> None:
        """Counts one accepted push, now."""
        self._times.append(self._clock())

    def per_second(self) -> float:
        """Accepted pushes per second over the last WINDOW seconds (at most `capacity` of them count)."""
        now = self._clock()
        return sum(1 for t in self._times if now - t <= WINDOW) / WINDOW

    def last_age(self) -> float | None:
        """Seconds since the last accepted push; None before the first."""
        return self._clock() - self._times[-1] if self._times else None
