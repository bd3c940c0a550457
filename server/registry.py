"""The optimizers a server holds: their state, locks and versions.

The registry owns concurrency: each optimizer applies one push at a time under
its own lock, and a pull copies its tensors under the same lock, so it never
sees half of a step. Requests arrive here already decoded and checked.
"""

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import numpy as np

from optserve.server.codec import Gradient
from optserve.server.engine import adam
from optserve.server.engine.config import AdamConfig, parse_config
from optserve.server.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from optserve.server.modes import DedupTable, PushResult, TrainingMode, aggregate

log = logging.getLogger("optserve.registry")

NON_FINITE_POLICIES = ("refuse", "apply")
STATE_KINDS = ("weights", "ema", "m", "v", "vhat")  # what a pull can read
_INT32_MAX = 2**31 - 1  # the engine's iteration counter saturates here


@dataclass(frozen=True)
class OptimizerInfo:
    """A snapshot of one optimizer's metadata."""

    name: str
    iterations: int
    version: int
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    device: str
    non_finite_policy: str
    next_learning_rate: float
    training_mode: TrainingMode
    pending_gradients: int  # sync: gradients in the open round


class Optimizer:
    """One named optimizer: Adam state on the device, and the rules that turn pushes into steps."""

    def __init__(self, name: str, config: AdamConfig, params: Mapping[str, np.ndarray],
                 non_finite_policy: str, training_mode: TrainingMode):
        self.name = name
        self.config = config
        self.non_finite_policy = non_finite_policy
        self.training_mode = training_mode
        self.shapes = {key: tuple(value.shape) for key, value in params.items()}
        self.rounds_closed_by_timeout = 0
        self._state = adam.init(params, config)
        self._step = adam.make_step(config, list(params))
        self._lock = threading.Lock()
        self._version_changed = threading.Condition(self._lock)
        self._version = 0
        self._iterations = 0
        self._deleted = False
        self._dedup = DedupTable()
        self._round: dict[str, Mapping[str, Gradient]] = {}  # sync: worker_id -> gradients, for self._version
        self._round_timer: threading.Timer | None = None

    def push(self, grads: Mapping[str, Gradient], worker_id: str = "", seq: int | None = None,
             base_version: int | None = None) -> PushResult:
        """Accepts one gradient for every tensor; see proto `PushHeader` for the arguments.

        Async: applies one Adam step now. Sync: adds the gradient to the open
        round, which applies one step on the aggregate once `num_workers`
        workers have pushed. A refused push changes nothing.
        """
        if seq is not None and not worker_id:
            raise InvalidArgument("worker_id: required with seq")
        sync = self.training_mode.mode == "sync"
        if sync and not worker_id:
            raise InvalidArgument("worker_id: required in sync mode (a round counts distinct workers)")
        if sync and base_version is None:
            raise InvalidArgument("base_version: required in sync mode (the version of the round)")
        if self.training_mode.max_staleness is not None and base_version is None:
            raise InvalidArgument("base_version: required when max_staleness is set")
        self._refuse_non_finite(grads)
        with self._lock:
            self._check_alive()
            if seq is not None:
                done = self._dedup.lookup(worker_id, seq)
                if done is not None:
                    return replace(done, applied=self._version >= done.version, duplicate=True)
            self._check_base_version(base_version)
            result = self._add_to_round(worker_id, seq, grads) if sync else self._apply(grads)
            if seq is not None:
                self._dedup.record(worker_id, seq, result)
            return result

    def pull(self, kind: str, names: Sequence[str], min_version: int | None = None,
             timeout: float | None = None) -> tuple[int, int, list[tuple[str, np.ndarray]]]:
        """Copies one kind of state tensor out (see STATE_KINDS) as one snapshot.

        Waits (on a condition, not by polling) up to `timeout` seconds for
        `min_version`. Returns (version, iterations, [(name, float32 array)]);
        `names` empty means every tensor in creation order.
        """
        if kind == "ema" and not self.config.use_ema:
            raise FailedPrecondition(f"kind: optimizer {self.name!r} keeps no EMA weights (use_ema is false)")
        if kind == "vhat" and not self.config.amsgrad:
            raise FailedPrecondition(f"kind: optimizer {self.name!r} keeps no vhat (amsgrad is false)")
        names = list(names) or list(self.shapes)
        for name in names:
            if name not in self.shapes:
                raise NotFound(f"names[{name!r}]: optimizer {self.name!r} has no tensor {name!r}")
        if len(set(names)) != len(names):
            raise InvalidArgument("names: a tensor is named twice")
        with self._lock:
            if min_version is not None:
                reached = self._version_changed.wait_for(
                    lambda: self._version >= min_version or self._deleted, timeout)
                if not reached:
                    raise DeadlineExceeded(
                        f"min_version: optimizer {self.name!r} is at version {self._version}, "
                        f"not {min_version}, after {timeout:.3g} s")
            self._check_alive()
            source = {"weights": self._state.params, "ema": self._state.ema, "m": self._state.m,
                      "v": self._state.v, "vhat": self._state.vhat}[kind]
            arrays = [(name, np.array(source[name])) for name in names]
            return self._version, self._iterations, arrays

    def finalize(self) -> None:
        """Copies the EMA into the weights (Keras `finalize_variable_values`)."""
        with self._lock:
            self._check_alive()
            if self.config.use_ema:
                self._state = adam.finalize(self._state)
                self._bump_version()

    def info(self) -> OptimizerInfo:
        """The optimizer's metadata as of now."""
        with self._lock:
            version, iterations, pending = self._version, self._iterations, len(self._round)
            device = next(iter(self._state.params.values())).devices().pop()
        return OptimizerInfo(
            name=self.name,
            iterations=iterations,
            version=version,
            config=self.config.to_keras_dict(),
            shapes=dict(self.shapes),
            device=f"{device.platform}:{device.id}",
            non_finite_policy=self.non_finite_policy,
            next_learning_rate=adam.learning_rate_at(self.config, iterations),
            training_mode=self.training_mode,
            pending_gradients=pending,
        )

    def close(self) -> None:
        """Marks the optimizer deleted: calls that hold it fail, waiting pulls wake up."""
        with self._lock:
            self._deleted = True
            self._cancel_round_timer()
            self._version_changed.notify_all()

    def _refuse_non_finite(self, grads: Mapping[str, Gradient]) -> None:
        if self.non_finite_policy != "refuse":
            return
        for name, grad in grads.items():
            values = grad[1] if isinstance(grad, tuple) else grad
            if not np.isfinite(values).all():
                raise InvalidArgument(
                    f"gradients[{name!r}]: contains NaN or Inf (this optimizer's non_finite_policy is 'refuse')")

    def _check_base_version(self, base_version: int | None) -> None:
        if base_version is None:
            return
        if base_version > self._version:
            raise InvalidArgument(f"base_version: {base_version} is ahead of the current version {self._version}")
        if self.training_mode.mode == "sync" and base_version < self._version:
            raise Aborted(f"base_version: the round for version {base_version} is closed; the optimizer is at "
                          f"version {self._version}: pull and push for that round")
        limit = self.training_mode.max_staleness
        if limit is not None and self._version - base_version > limit:
            raise Aborted(f"base_version: {base_version} is {self._version - base_version} versions behind the "
                          f"current version {self._version} (max_staleness {limit}): pull and recompute")

    def _apply(self, grads: Mapping[str, Gradient]) -> PushResult:
        """One Adam step, under the lock."""
        device_grads = {name: _to_device(grads[name]) for name in self.shapes}
        self._state = self._step(self._state, device_grads)
        jax.block_until_ready(self._state)
        self._iterations = min(self._iterations + 1, _INT32_MAX)
        self._bump_version()
        return PushResult(self._version, self._iterations, applied=True)

    def _add_to_round(self, worker_id: str, seq: int | None, grads: Mapping[str, Gradient]) -> PushResult:
        """Sync mode, under the lock: one worker's gradient joins the open round."""
        if worker_id in self._round:
            raise Aborted(f"worker_id: {worker_id!r} has pushed for version {self._version} already; "
                          f"wait for version {self._version + 1}")
        result = PushResult(self._version + 1, self._iterations, applied=False)
        self._round[worker_id] = grads
        if len(self._round) >= self.training_mode.num_workers:
            self._close_round()
            return replace(result, iterations=self._iterations, applied=True)
        if self._round_timer is None:
            self._round_timer = threading.Timer(self.training_mode.sync_timeout, self._close_round_on_timeout,
                                                args=(self._version,))
            self._round_timer.daemon = True
            self._round_timer.start()
        return result

    def _close_round(self) -> None:
        """Applies one step on the round's aggregate, under the lock."""
        self._cancel_round_timer()
        combined = aggregate(self._round, self.training_mode.aggregation, self.shapes)
        self._round = {}
        self._apply(combined)

    def _close_round_on_timeout(self, round_version: int) -> None:
        with self._lock:
            if self._deleted or self._version != round_version or not self._round:
                return
            log.warning("optimizer %r: sync round for version %d closed by timeout after %.3g s with %d of %d "
                        "gradients (workers %s)", self.name, round_version + 1, self.training_mode.sync_timeout,
                        len(self._round), self.training_mode.num_workers, sorted(self._round))
            self.rounds_closed_by_timeout += 1
            self._round_timer = None
            self._close_round()

    def _cancel_round_timer(self) -> None:
        if self._round_timer is not None:
            self._round_timer.cancel()
            self._round_timer = None

    def _bump_version(self) -> None:
        self._version += 1
        self._version_changed.notify_all()

    def _check_alive(self) -> None:
        if self._deleted:
            raise NotFound(f"optimizer {self.name!r} was deleted")


class Registry:
    """The named optimizers of one server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._optimizers: dict[str, Optimizer] = {}

    def create(self, name: str, config: Mapping[str, Any], params: Mapping[str, np.ndarray],
               non_finite_policy: str = "refuse", training_mode: TrainingMode = TrainingMode()) -> Optimizer:
        """Creates an optimizer; ALREADY_EXISTS if the name is taken."""
        if non_finite_policy not in NON_FINITE_POLICIES:
            raise InvalidArgument(f"non_finite_policy: must be one of {NON_FINITE_POLICIES}")
        adam_config = parse_config(config)
        self._refuse_taken(name)
        optimizer = Optimizer(name, adam_config, params, non_finite_policy, training_mode)
        with self._lock:
            self._refuse_taken(name)
            self._optimizers[name] = optimizer
        return optimizer

    def get(self, name: str) -> Optimizer:
        """The optimizer of that name; NOT_FOUND if there is none."""
        optimizer = self._optimizers.get(name)
        if optimizer is None:
            raise NotFound(f"optimizer {name!r} not found")
        return optimizer

    def list(self) -> list[Optimizer]:
        """Every optimizer, sorted by name."""
        with self._lock:
            return [self._optimizers[name] for name in sorted(self._optimizers)]

    def delete(self, name: str) -> None:
        """Removes an optimizer; NOT_FOUND if there is none."""
        with self._lock:
            optimizer = self._optimizers.pop(name, None)
        if optimizer is None:
            raise NotFound(f"optimizer {name!r} not found")
        optimizer.close()

    def _refuse_taken(self, name: str) -> None:
        if name in self._optimizers:
            raise AlreadyExists(f"name: an optimizer named {name!r} exists already")


def _to_device(grad: Gradient) -> jax.Array | adam.SparseGrad:
    if isinstance(grad, tuple):
        return adam.sparse_grad(*grad)
    return jax.device_put(grad)
