"""The optimizers a server holds: their state, locks and versions.

The registry owns concurrency: each optimizer applies one push at a time under
its own lock, and a pull copies its tensors under the same lock, so it never
sees half of a step. Requests arrive here already decoded and checked.
"""

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from optserve.server.codec import Gradient
from optserve.server.engine import adam
from optserve.server.engine.config import AdamConfig, parse_config
from optserve.server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

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


class Optimizer:
    """One named optimizer: Adam state on the device, one step per push."""

    def __init__(self, name: str, config: AdamConfig, params: Mapping[str, np.ndarray], non_finite_policy: str):
        self.name = name
        self.config = config
        self.non_finite_policy = non_finite_policy
        self.shapes = {key: tuple(value.shape) for key, value in params.items()}
        self._state = adam.init(params, config)
        self._step = adam.make_step(config, list(params))
        self._lock = threading.Lock()
        self._version = 0
        self._iterations = 0
        self._deleted = False

    def push(self, grads: Mapping[str, Gradient]) -> tuple[int, int]:
        """Applies one Adam step with a gradient for every tensor.

        Returns (version, iterations) after the step. A refused push changes
        nothing.
        """
        device_grads = {name: _to_device(grads[name]) for name in self.shapes}
        if self.non_finite_policy == "refuse" and not adam.all_finite(device_grads):
            raise InvalidArgument(
                f"gradients[{_first_non_finite(grads)!r}]: contains NaN or Inf"
                " (this optimizer's non_finite_policy is 'refuse')"
            )
        with self._lock:
            self._check_alive()
            self._state = self._step(self._state, device_grads)
            jax.block_until_ready(self._state)
            self._iterations = min(self._iterations + 1, _INT32_MAX)
            self._version += 1
            return self._version, self._iterations

    def pull(self, kind: str, names: Sequence[str]) -> tuple[int, int, list[tuple[str, np.ndarray]]]:
        """Copies one kind of state tensor out (see STATE_KINDS) as one snapshot.

        Returns (version, iterations, [(name, float32 array)]); `names` empty
        means every tensor in creation order.
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
                self._version += 1

    def info(self) -> OptimizerInfo:
        """The optimizer's metadata as of now."""
        with self._lock:
            version, iterations = self._version, self._iterations
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
        )

    def close(self) -> None:
        """Marks the optimizer deleted: pushes and pulls that hold it fail."""
        with self._lock:
            self._deleted = True

    def _check_alive(self) -> None:
        if self._deleted:
            raise NotFound(f"optimizer {self.name!r} was deleted")


class Registry:
    """The named optimizers of one server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._optimizers: dict[str, Optimizer] = {}

    def create(
        self, name: str, config: Mapping[str, Any], params: Mapping[str, np.ndarray], non_finite_policy: str
    ) -> Optimizer:
        """Creates an optimizer; ALREADY_EXISTS if the name is taken."""
        if non_finite_policy not in NON_FINITE_POLICIES:
            raise InvalidArgument(f"non_finite_policy: must be one of {NON_FINITE_POLICIES}")
        adam_config = parse_config(config)
        self._refuse_taken(name)
        optimizer = Optimizer(name, adam_config, params, non_finite_policy)
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


def _first_non_finite(grads: Mapping[str, Gradient]) -> str:
    for name, grad in grads.items():
        values = grad[1] if isinstance(grad, tuple) else grad
        if not np.isfinite(values.astype(np.float32)).all():
            return name
    return next(iter(grads))
