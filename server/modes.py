"""Distributed-training modes: settings, sync-round aggregation, exactly-once bookkeeping.

The registry decides when to use them, under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optserve.server.engine import aggregate, pipeline
from optserve.server.errors import FailedPrecondition, InvalidArgument
from optserve.wire.layout import FlatLayout

Gradient = np.ndarray | tuple[np.ndarray, np.ndarray]  # dense, or sparse (indices, rows)

MODES = ("async", "sync")
AGGREGATIONS = ("mean", "sum")
DEFAULT_SYNC_TIMEOUT = 60.0  # seconds


@dataclass(frozen=True)
class TrainingMode:
    """How pushes become steps; see proto `TrainingMode` for each field."""

    mode: str = "async"
    num_workers: int = 1
    backup_workers: int = 0
    aggregation: str = "mean"
    sync_timeout: float = DEFAULT_SYNC_TIMEOUT
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        field = "training_mode"
        if self.mode not in MODES:
            raise InvalidArgument(f"{field}.mode: must be one of {MODES}, got {self.mode!r}")
        if self.aggregation not in AGGREGATIONS:
            raise InvalidArgument(f"{field}.aggregation: must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.num_workers < 1:
            raise InvalidArgument(f"{field}.num_workers: must be >= 1, got {self.num_workers}")
        if self.backup_workers < 0:
            raise InvalidArgument(f"{field}.backup_workers: must be >= 0, got {self.backup_workers}")
        if not (0 < self.sync_timeout < float("inf")):
            raise InvalidArgument(f"{field}.sync_timeout_seconds: must be > 0 and finite, got {self.sync_timeout}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise InvalidArgument(f"{field}.max_staleness: must be >= 0, got {self.max_staleness}")
        if self.mode == "async" and (self.num_workers != 1 or self.backup_workers):
            raise InvalidArgument(f"{field}.num_workers: only sync mode takes num_workers and backup_workers")
        if self.mode == "sync" and self.max_staleness is not None:
            raise InvalidArgument(f"{field}.max_staleness: sync mode refuses every gradient for an old round already")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data."""
        return asdict(self)


@dataclass(frozen=True)
class PushResult:
    """What a push answers: see proto `PushGradientsResponse`."""

    version: int  # the version whose weights include the gradient
    iterations: int  # Adam steps applied at that version
    duplicate: bool = False  # answers a retry of an already accepted (worker_id, seq)


class DedupTable:
    """Remembers each worker's accepted pushes so a retried (worker_id, seq) is answered, not applied.

    Sequence numbers must increase per worker. The results of the last
    `window` accepted pushes of each worker are kept for answering retries.
    """

    def __init__(self, window: int = 1024):
        self._window = window
        self._recent: dict[str, OrderedDict[int, PushResult]] = {}

    def lookup(self, worker_id: str, seq: int) -> PushResult | None:
        """The stored result of an accepted (worker_id, seq); None for a new seq."""
        recent = self._recent.get(worker_id)
        if not recent:
            return None
        if seq in recent:
            return recent[seq]
        last = next(reversed(recent))
        if seq <= last:
            raise FailedPrecondition(
                f"seq: {seq} is not above worker {worker_id!r}'s last accepted seq {last}; seqs must increase"
            )
        return None

    def record(self, worker_id: str, seq: int, result: PushResult) -> None:
        """Stores the result of an accepted push."""
        recent = self._recent.setdefault(worker_id, OrderedDict())
        recent[seq] = result
        while len(recent) > self._window:
            recent.popitem(last=False)

    def forget(self, worker_id: str, seq: int) -> None:
        """Drops an entry whose push was refused after all (a sync round that could not be logged)."""
        self._recent.get(worker_id, {}).pop(seq, None)

    def to_json(self) -> dict[str, list[list[int]]]:
        """The table as plain data: worker -> [[seq, version, iterations], ...], oldest first."""
        return {worker: [[seq, r.version, r.iterations] for seq, r in recent.items()]
                for worker, recent in self._recent.items()}

    def load_json(self, data: Mapping[str, list[list[int]]]) -> None:
        """Restores what `to_json` wrote."""
        for worker, entries in data.items():
            for seq, version, iterations in entries:
                self.record(worker, seq, PushResult(version, iterations))


class RoundGradients(Mapping[str, "Gradient"]):
    """A sync round's gradient: the dense tensors' sums in one flat device buffer, the sparse ones on the host.

    `flat` is in the optimizer's layout (its padding, and the segments of
    the sparse tensors, hold anything) or None when every tensor is sparse;
    the step takes it as it is. As a mapping (for the log and the metrics)
    a dense tensor is a read-only host view of `flat`, valid until the next
    round reuses the buffer.
    """

    def __init__(self, layout: FlatLayout, flat: jax.Array | None, sparse: dict[str, tuple[np.ndarray, np.ndarray]],
                 present: frozenset[str] | None = None):
        self.layout, self.flat, self.sparse = layout, flat, sparse
        self.present = present  # the tensors some gradient of the round carried; None: every tensor
        self._host: np.ndarray | None = None

    def __getitem__(self, name: str) -> Gradient:
        if name in self.sparse:
            return self.sparse[name]
        if name not in self.layout.shapes or self.flat is None or (self.present is not None and name not in self.present):
            raise KeyError(name)
        if self._host is None:
            self._host = np.asarray(self.flat)
        offset = self.layout.offsets[name]
        return self._host[offset:offset + self.layout.sizes[name]].reshape(self.layout.shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.shapes if self.present is None else
                    [name for name in self.layout.shapes if name in self.present])

    def __len__(self) -> int:
        return len(self.layout.shapes) if self.present is None else len(self.present)

    def block_until_ready(self) -> RoundGradients:
        """Waits for the sum (what `jax.block_until_ready` calls on an object it does not know)."""
        if self.flat is not None:
            self.flat.block_until_ready()
        return self


class RoundSum:
    """Combines each sync round's gradients in sorted worker-id order, dense ones on the device.

    The fixed order makes the float32 sum, and so the step, independent of
    arrival order. The dense gradients are summed by `engine.aggregate` as
    one flat buffer per worker, in the optimizer's layout (the worker's own
    receive buffer when its push arrived in that layout, else a copy), into
    the flat device buffer that the previous round's sum used (donated, so
    XLA writes in place): the result is the step's flat gradient as it is.
    Sparse gradients are concatenated on the host (the engine sums their
    duplicate rows, as Keras's IndexedSlices all-reduce does); a tensor that
    some workers sent dense and others sparse is densified. "mean" divides by
    the number of gradients in the round. A tensor that some gradients lack
    (pushes with missing SKIP) counts as zero in them; one that all lack is
    not in the result, so the step skips it.
    """

    def __init__(self, how: str, layout: FlatLayout):
        self._mean = how == "mean"
        self._layout = layout
        self._buffer: jax.Array | None = None  # the last round's flat sum, donated to the next

    def combine(self, contributions: Mapping[str, Mapping[str, Gradient]]) -> RoundGradients:
        """The round's gradient: the dense tensors' sums in one flat device buffer, the sparse ones on the host."""
        workers = sorted(contributions)
        shapes = self._layout.shapes
        sparse: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        dense: list[str] = []
        present = frozenset(name for w in workers for name in contributions[w])
        for name in shapes:
            grads = [contributions[w][name] for w in workers if name in contributions[w]]
            if not grads:
                continue
            if all(isinstance(g, tuple) for g in grads):
                values = np.concatenate([g[1].astype(np.float32) for g in grads])
                indices = np.concatenate([g[0].astype(np.int64) for g in grads])
                sparse[name] = (indices, values / np.float32(len(workers)) if self._mean else values)
            else:
                dense.append(name)
        present = None if len(present) == len(shapes) else present
        if not dense:
            return RoundGradients(self._layout, None, sparse, present)
        flats = [pipeline.flat_grads(self._layout, {name: _dense(contributions[w].get(name), shapes[name]) for name in dense}
                                 ).dense for w in workers]
        if self._buffer is None:
            self._buffer = jnp.zeros(self._layout.size, jnp.float32)
        self._buffer = aggregate.sum_in_order({"flat": self._buffer}, [{"flat": f} for f in flats],
                                              self._mean)["flat"]
        return RoundGradients(self._layout, self._buffer, sparse, present)


def _dense(grad: Gradient | None, shape: tuple[int, ...]) -> np.ndarray:
    """A worker's gradient of one tensor as a dense array: zeros for none, sparse rows summed into place."""
    if grad is None:
        return np.zeros(shape, np.float32)
    if not isinstance(grad, tuple):
        return grad
    indices, values = grad
    dense = np.zeros(shape, np.float32)
    np.add.at(dense, indices, values.astype(np.float32))
    return dense
