"""A sync round: the gradients of distinct workers for one version, until the round closes.

`SyncRound` holds the open round's gradients (and the memory they view), its
straggler timer, and what is known of the last dropped round, so that the
pushes that waited on it learn why. It has no lock of its own: the
optimizer calls it under its lock, and decides when to close and how to apply.
"""

import threading
from collections.abc import Callable, Collection, Mapping

import numpy as np

from optserve.server import overflow
from optserve.server.errors import Aborted, OptserveError, ResourceExhausted
from optserve.server.modes import Gradient, RoundGradients, RoundSum
from optserve.wire.layout import FlatLayout


class SyncRound:
    """The open round's gradients, one per worker, and the bookkeeping of rounds closed so far."""

    def __init__(self, aggregation: str, layout: FlatLayout):
        self._gradients: dict[str, Mapping[str, Gradient]] = {}  # worker_id -> gradients
        self._seqs: dict[str, int | None] = {}  # worker_id -> seq of its gradient in the round
        self._magnitudes: dict[str, list[overflow.Magnitude]] = {}  # worker_id -> its gradients' sizes
        self._holds: list[Callable[[], None]] = []  # release the buffers the round's gradients view
        self._sum = RoundSum(aggregation, layout)
        self._timer: threading.Timer | None = None
        self.generation = 0  # rounds closed (applied or dropped) so far
        self.dropped_version = -1  # the version the last dropped round would have made
        self.dropped_error: OptserveError = ResourceExhausted("the data dir is full")  # why it was dropped
        self._dropped_generation = -1  # the generation of the last dropped round

    def __len__(self) -> int:
        """Gradients in the open round."""
        return len(self._gradients)

    def workers(self) -> list[str]:
        """The workers of the open round, sorted."""
        return sorted(self._gradients)

    def add(self, worker_id: str, seq: int | None, grads: Mapping[str, Gradient], version: int,
            retain: Callable[[], Callable[[], None]] | None = None,
            magnitudes: list[overflow.Magnitude] | None = None) -> None:
        """One worker's gradient joins the round for `version` (ABORTED for its second); the round holds its memory."""
        if worker_id in self._gradients:
            raise Aborted(f"worker_id: {worker_id!r} has pushed for version {version} already; "
                          f"wait for version {version + 1}")
        if retain is not None:
            self._holds.append(retain())
        self._gradients[worker_id], self._seqs[worker_id] = grads, seq
        self._magnitudes[worker_id] = magnitudes or []

    def sequenced(self) -> list[tuple[str, int]]:
        """(worker_id, seq) of the round's gradients that carry a seq, by worker."""
        return [(worker, seq) for worker, seq in sorted(self._seqs.items()) if seq is not None]

    def means(self, names: Collection[str], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """Each of `names` (non-trainable state) averaged over the round's gradients that carry it, in worker order.

        A gradient without it does not count (it is no zero), whatever the round's aggregation.
        """
        means = {}
        for name in sorted(names):
            carried = [self._gradients[worker][name] for worker in self.workers() if name in self._gradients[worker]]
            if carried:
                total = np.zeros(shapes[name], np.float32)
                for value in carried:  # in worker order: the same sum on every run
                    total += np.asarray(value, np.float32)
                means[name] = total / np.float32(len(carried))
        return means

    def combine(self) -> tuple[RoundGradients, list[overflow.Magnitude]]:
        """The round's aggregate, done reading the gradients' buffers, and the bound of its magnitudes."""
        combined = self._sum.combine(self._gradients)
        combined.block_until_ready()
        return combined, overflow.combined(list(self._magnitudes.values()))

    def drop(self, version: int, error: OptserveError) -> None:
        """Records that the round for `version` was refused with `error` (call before `close`)."""
        self.dropped_version, self.dropped_error, self._dropped_generation = version, error, self.generation

    def was_dropped(self, version: int, generation: int | None) -> bool:
        """Whether the round for `version` was dropped; with `generation`, that round only (not a later one)."""
        return self.dropped_version == version and generation in (None, self._dropped_generation)

    def close(self) -> None:
        """Ends the open round (applied or dropped): forgets its gradients and gives their memory back."""
        self.cancel_timer()
        self._gradients, self._seqs, self._magnitudes = {}, {}, {}
        self.generation += 1
        holds, self._holds = self._holds, []
        for release in holds:
            release()

    def start_timer(self, seconds: float, on_timeout: Callable[[int], None], version: int) -> None:
        """Calls `on_timeout(version)` after `seconds`, unless the round closes first (once per round)."""
        if self._timer is not None:
            return
        self._timer = threading.Timer(seconds, on_timeout, args=(version,))
        self._timer.daemon = True
        self._timer.start()

    def timer_fired(self) -> None:
        """Forgets the timer that just called back."""
        self._timer = None

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
