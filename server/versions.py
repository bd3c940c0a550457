"""An optimizer's version counter, and the waits for a version that never poll.

Every change of the weights (a step, a finalize that changes them) adds one;
a waiter sleeps on the condition of the optimizer's own lock until the
version it wants arrives, or something else it names ends the wait.
"""

import threading
from collections.abc import Callable


class VersionGate:
    """The version and its condition; every method is called with `lock` held."""

    def __init__(self, lock: threading.Lock, version: int = 0):
        self.version = version
        self._changed = threading.Condition(lock)

    def bump(self) -> int:
        """One more version; wakes every waiter. Returns the new version."""
        self.version += 1
        self._changed.notify_all()
        return self.version

    def notify(self) -> None:
        """Wakes every waiter to look again (a round dropped, a call ended, the optimizer deleted)."""
        self._changed.notify_all()

    def wait(self, version: int, timeout: float | None, stop: Callable[[], bool] = lambda: False) -> bool:
        """Waits until `version` is reached or `stop()` holds, at most `timeout` s; whether either happened."""
        return self._changed.wait_for(lambda: self.version >= version or stop(), timeout)
