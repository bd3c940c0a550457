"""optserve for Keras 3: `RemoteOptimizer`, a keras.optimizers.Optimizer whose step runs on an optserve server.

    os.environ["KERAS_BACKEND"] = "jax"     # or "tensorflow"; before Keras loads
    model.compile(optimizer=RemoteOptimizer("127.0.0.1:50051", "mnist", {"learning_rate": 1e-3}), loss=...)
    model.fit(x, y)           # compiled: each step pushes the gradients and assigns the pulled weights

The exchange with the server runs on the host from inside the compiled step:
on the JAX backend through an ordered `jax.experimental.io_callback` (in the
jitted step), on the TensorFlow backend through `tf.py_function` (in the
`tf.function` step, which must not be XLA-compiled: `jit_compile=False`, Keras's
choice on a machine without a GPU). Another backend (torch) is refused with
FAILED_PRECONDITION. KERAS_BACKEND defaults to jax here, the backend the
`keras` extra installs (`pip install "optserve[keras]"`; TensorFlow: `"optserve[tensorflow]"`).
"""

import os
import types
from collections.abc import Mapping
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")  # before Keras loads: the backend the keras extra installs

import grpc  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from optserve.client import Client, OptserveError  # noqa: E402
from optserve.keras_worker import (STALE_RETRIES, KerasWorker, RemoteOptimizerMixin, local_learning_rate,  # noqa: E402
                                   server_state)

__all__ = ["RemoteOptimizer", "STALE_RETRIES"]

BACKENDS = ("jax", "tensorflow")  # the backends whose compiled step can call the host


class RemoteOptimizer(RemoteOptimizerMixin, keras.optimizers.Optimizer):
    """A Keras 3 optimizer whose state and step live on an optserve server (Keras Adam's numbers by default).

    `client` is a `Client` or an address; `name` the optimizer on the server,
    created from the model's trainable variables (named "0/kernel", "1/bias", ...: position and name) with
    `config` (Keras arguments of the server's optimizer) and
    `create_or_mode_options` by the first worker whose `build` runs; the
    others attach (a disagreeing shape, config or mode is refused with
    ALREADY_EXISTS) and start from the server's weights. Clipping, weight
    decay and EMA belong in `config`: they run on the server. A variable
    whose gradient is None is skipped (`missing="skip"`), as Keras skips it.

    `model` (the Keras model being trained) keeps its floating-point
    non-trainable variables, BatchNorm's moving statistics, on the server
    too: created with the optimizer, pushed with every step and assigned
    back (in sync mode the round's mean). Without it they stay local.
    """

    def __init__(self, client: Client | str, name: str, config: Mapping[str, Any] | None = None,
                 optimizer: str = "Adam", *, worker_id: str | None = None, model: Any = None,
                 **create_or_mode_options: Any):
        backend = keras.backend.backend()
        if backend not in BACKENDS:
            raise OptserveError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"backend: optserve.keras runs on Keras's JAX or TensorFlow backend, this one is "
                                f"{backend!r} (set KERAS_BACKEND=jax or tensorflow before Keras loads)")
        super().__init__(learning_rate=local_learning_rate(config), name="optserve")
        if backend == "jax":
            from optserve.keras_worker import jax_step as step
        else:
            from optserve.keras_worker import tf_step as step
        self._step = step
        state = server_state(model)
        # not Keras-tracked (the model's own variables, host arrays); `deferred`: JAX with state, where the wrapped
        # train_step pushes the gradients `stashed` by the optimizer's callback, and gets back the `returned` weights
        self._held = types.SimpleNamespace(model=model, state=state, deferred=bool(state) and backend == "jax",
                                           stashed=([], ()), returned=[])
        self._worker = KerasWorker(client, name, config, optimizer, worker_id, create_or_mode_options, "keras")
        if self._held.deferred:
            self._step.exchange_after_step(model, state, self._exchange_after_step)

    def build(self, variables: list) -> None:
        """Creates or attaches to the server's optimizer, and starts the variables from its weights."""
        super().build(variables)
        with self._step.outside_the_step():  # Keras on TensorFlow builds it while tracing the step
            pulled = self._worker.attach([v.name for v in variables], [v.value for v in variables],
                                         [v.name for v in self._held.state], [v.value for v in self._held.state])
            for variable, value in zip([*variables, *self._held.state], pulled):
                variable.assign(value)
        if self._held.deferred:  # the model's trainable variables, in the order its train_step holds them
            self._held.returned = [self._worker.names[self._get_variable_index(v)]
                                   for v in self._held.model.trainable_variables]

    def _backend_apply_gradients(self, grads: list, trainable_variables: list) -> None:
        """One step on the server, called from the host by the compiled step: push the gradients, assign the weights.

        JAX with state: only keeps the gradients; the wrapped train_step pushes them with the new statistics.
        """
        names = [self._worker.names[self._get_variable_index(v)] for v in trainable_variables]
        if self._held.deferred:
            self._step.stash_in_step(lambda *arrays: setattr(self._held, "stashed", (names, arrays)), grads)
            return
        count = len(grads)
        self._step.exchange_in_step(lambda *arrays: self._worker.exchange(names, arrays[:count], arrays[count:]),
                                    grads, trainable_variables, self._held.state)

    def _exchange_after_step(self, *state: np.ndarray) -> list[np.ndarray]:
        """JAX with state, on the host: push the kept gradients with the step's statistics; returns the model's
        new trainable weights (in its order) and the server's statistics."""
        names, grads = self._held.stashed
        self._held.stashed = ([], ())
        return self._worker.exchange(names, grads, state, self._held.returned)
