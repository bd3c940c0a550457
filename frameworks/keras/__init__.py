"""optserve for Keras 3: `RemoteOptimizer`, a keras.optimizers.Optimizer whose step runs on an optserve server.

    os.environ["KERAS_BACKEND"] = "jax"
    model.compile(optimizer=RemoteOptimizer("127.0.0.1:50051", "mnist", {"learning_rate": 1e-3}), loss=...)
    model.fit(x, y)           # compiled (jit): each step pushes the gradients and assigns the pulled weights

The exchange with the server runs on the host from inside the compiled step,
through `jax.experimental.io_callback` (ordered, so steps never overlap or
reorder). The JAX backend only: on another backend the constructor refuses
with FAILED_PRECONDITION. Needs the `keras` extra (`pip install "optserve[keras]"`).
"""

import os
import uuid
from collections.abc import Mapping
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")  # before Keras loads: the backend this module runs on

import grpc  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from optserve.client import Client, OptserveError  # noqa: E402

__all__ = ["RemoteOptimizer"]

STALE_RETRIES = 3  # a push refused as too stale (ABORTED) is retried against the current version this many times


class RemoteOptimizer(keras.optimizers.Optimizer):
    """A Keras 3 optimizer whose state and step live on an optserve server (Keras Adam's numbers by default).

    `client` is a `Client` or an address; `name` the optimizer on the server,
    created from the model's trainable variables (named "0/kernel", "1/bias", ...: position and name) with
    `config` (Keras arguments of the server's optimizer) and
    `create_or_mode_options` by the first worker whose `build` runs; the
    others attach (a disagreeing shape, config or mode is refused with
    ALREADY_EXISTS) and start from the server's weights. Clipping, weight
    decay and EMA belong in `config`: they run on the server. A variable
    whose gradient is None is skipped (`missing="skip"`), as Keras skips it.
    """

    def __init__(self, client: Client | str, name: str, config: Mapping[str, Any] | None = None,
                 optimizer: str = "Adam", *, worker_id: str | None = None, **create_or_mode_options: Any):
        if keras.backend.backend() != "jax":
            raise OptserveError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"backend: optserve.keras runs on Keras's JAX backend, this one is "
                                f"{keras.backend.backend()!r} (set KERAS_BACKEND=jax)")
        learning_rate = (config or {}).get("learning_rate", 0.001)
        super().__init__(learning_rate=learning_rate if isinstance(learning_rate, (int, float)) else 0.001,
                         name="optserve")
        self._owns_client = isinstance(client, str)
        self.client = Client(client) if isinstance(client, str) else client
        self.remote_name = name
        self.remote_config = dict(config or {})
        self.create_options = {**create_or_mode_options, "optimizer": optimizer}
        self.worker_id = worker_id or f"keras-{uuid.uuid4().hex}"
        self.remote = None
        self._names: list[str] = []
        self._seq = 0
        self._version = 0

    def build(self, variables: list) -> None:
        """Creates or attaches to the server's optimizer, and starts the variables from its weights."""
        super().build(variables)
        self._names = _variable_names(variables)
        self.remote = self.client.create_optimizer(
            self.remote_name, {n: np.asarray(v.value) for n, v in zip(self._names, variables)},
            self.remote_config, if_exists="attach", **self.create_options)
        pulled = self.remote.pull()
        for name, variable in zip(self._names, variables):
            variable.assign(pulled[name])
        self._version = pulled.version

    def _backend_apply_gradients(self, grads: list, trainable_variables: list) -> None:
        """One step on the server, called from the host by the compiled step: push the gradients, assign the weights."""
        import jax  # the backend's own: loaded already
        from jax.experimental import io_callback

        names = [self._names[self._get_variable_index(v)] for v in trainable_variables]
        shapes = [jax.ShapeDtypeStruct(tuple(v.shape), np.dtype(v.dtype)) for v in trainable_variables]
        values = io_callback(lambda *arrays: self._exchange(names, arrays), shapes, *grads, ordered=True)
        for variable, value in zip(trainable_variables, values):
            variable.assign(value)

    def _exchange(self, names: list[str], grads: tuple) -> list[np.ndarray]:
        """On the host: one push of these gradients (the others skipped), then the new weights of these variables."""
        base_version = self._version
        for attempt in range(STALE_RETRIES + 1):
            try:
                result = self.remote.push(dict(zip(names, grads)), worker_id=self.worker_id, seq=self._seq,
                                          base_version=base_version, missing="skip")
                break
            except OptserveError as err:
                if err.code() != grpc.StatusCode.ABORTED or attempt == STALE_RETRIES:
                    raise
                base_version = self.remote.info().version
        self._seq += 1
        pulled = self.remote.pull(min_version=int(result))
        self._version = pulled.version
        return [np.asarray(pulled[name]) for name in names]

    def get_config(self) -> dict[str, Any]:
        """The Keras config: where the optimizer lives, not its state (that stays on the server)."""
        return {**super().get_config(), "address": self.client.address, "remote_name": self.remote_name,
                "remote_config": self.remote_config, "create_options": self.create_options}


def _variable_names(variables: list) -> list[str]:
    """The tensors' names on the server: "<position>/<variable name>" ("0/kernel", "1/bias").

    Stable for one architecture in every process: a variable's `path` is not,
    since Keras numbers layers and models as they are made ("sequential_4/dense_8").
    """
    return [f"{index}/{variable.name}" for index, variable in enumerate(variables)]
