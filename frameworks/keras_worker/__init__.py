"""What every Keras adapter shares: the variables' names, create-or-attach, and one step's exchange with the server.

`optserve.keras` (Keras 3, JAX and TensorFlow backends) and `optserve.tf_keras`
(Keras 2) each hold a `KerasWorker`; only how the compiled step reaches the host
differs (`jax_step`, `tf_step`). Imports no framework.
"""

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from optserve.client import Client, InvalidArgumentError, Optimizer, OptserveError

__all__ = ["KerasWorker", "RemoteOptimizerMixin", "STALE_RETRIES", "local_learning_rate", "server_state",
           "tensor_names"]

STALE_RETRIES = 3  # a push refused as too stale (ABORTED) is retried against the current version this many times


class KerasWorker:
    """One Keras worker of the server's optimizer `name`: creates or attaches to it, then pushes and pulls each step.

    `config` (the server optimizer's Keras arguments) and `create_options`
    (with `optimizer`, the class) create it when this worker is the first;
    a later worker attaches (a disagreeing shape, config or mode is refused
    with ALREADY_EXISTS). `worker_id` names the worker for exactly-once pushes.
    """

    def __init__(self, client: Client | str, name: str, config: Mapping[str, Any] | None, optimizer: str,
                 worker_id: str | None, create_options: Mapping[str, Any], prefix: str):
        self.owns_client = isinstance(client, str)
        self.client = Client(client) if isinstance(client, str) else client
        self.name = name
        self.config = dict(config or {})
        self.create_options = {**create_options, "optimizer": optimizer}
        self.worker_id = worker_id or f"{prefix}-{uuid.uuid4().hex}"
        self.remote: Optimizer | None = None
        self.names: list[str] = []  # the server's tensor names, in the order of the optimizer's variables
        self.state_names: list[str] = []  # the non-trainable variables kept on the server ("state/0/moving_mean")
        self.seq = 0  # the next push's seq
        self.version = 0  # of the weights last assigned to the variables

    def attach(self, variable_names: Sequence[str], values: Sequence[Any],
               state_variable_names: Sequence[str] = (), state_values: Sequence[Any] = ()) -> list[np.ndarray]:
        """Creates the optimizer from these values (or attaches to it); returns the server's weights, then its state.

        The state (non-trainable variables, named "state/<position>/<name>") is
        kept beside the weights, never stepped: a push's values replace it (a
        sync round's mean in sync mode).
        """
        self.names = tensor_names(variable_names)
        self.state_names = [f"state/{name}" for name in tensor_names(state_variable_names)]
        self.remote = self.client.create_optimizer(self.name, dict(zip(self.names, values)), self.config,
                                                   if_exists="attach", state=dict(zip(self.state_names, state_values))
                                                   or None, **self.create_options)
        pulled = self.remote.pull()
        self.version = pulled.version
        return [pulled[name] for name in (*self.names, *self.state_names)]

    def exchange(self, names: Sequence[str], grads: Sequence[Any], state: Sequence[Any] = (),
                 returned: Sequence[str] | None = None) -> list[np.ndarray]:
        """On the host: one push of these gradients (the other tensors skipped) and the state's values, then
        the new weights of `returned` (default: `names`) followed by the server's state (`state_names` order).

        A push refused as too stale (ABORTED) is retried against the server's
        current version up to STALE_RETRIES times: the gradient is then applied as fresh.
        """
        base_version = self.version
        for attempt in range(STALE_RETRIES + 1):
            try:
                result = self.remote.push(dict(zip(names, grads)), worker_id=self.worker_id, seq=self.seq,
                                          base_version=base_version, missing="skip",
                                          state=dict(zip(self.state_names, state)) or None)
                break
            except OptserveError as err:
                if err.code() != grpc.StatusCode.ABORTED or attempt == STALE_RETRIES:
                    raise
                base_version = self.remote.info().version
        self.seq += 1
        pulled = self.remote.pull(min_version=int(result))
        self.version = pulled.version
        return [np.asarray(pulled[name]) for name in (*(names if returned is None else returned), *self.state_names)]

    def keras_config(self) -> dict[str, Any]:
        """The optimizer's entries in its Keras config: where it lives, not its state (that stays on the server)."""
        return {"address": self.client.address, "remote_name": self.name, "remote_config": self.config,
                "create_options": self.create_options}


class RemoteOptimizerMixin:
    """What both Kerases' RemoteOptimizer show of their `KerasWorker` (`self._worker`): first in their bases."""

    _worker: KerasWorker

    @property
    def client(self) -> Client:
        """The client this optimizer talks through."""
        return self._worker.client

    @property
    def remote(self) -> Optimizer | None:
        """The server's optimizer, once `build` has created or attached to it."""
        return self._worker.remote

    @property
    def worker_id(self) -> str:
        """This worker's id for exactly-once pushes."""
        return self._worker.worker_id

    def get_config(self) -> dict[str, Any]:
        """The Keras config: where the optimizer lives, not its state (that stays on the server)."""
        return {**super().get_config(), **self._worker.keras_config()}  # type: ignore[misc]


def tensor_names(variable_names: Sequence[str]) -> list[str]:
    """The tensors' names on the server: "<position>/<variable name>" ("0/kernel", "1/bias").

    Stable for one architecture in every process and in both Kerases: Keras 2's
    "dense_3/kernel:0" and Keras 3's paths ("sequential_4/dense_8/kernel") number
    layers as they are made, so only the last part, without ":0", is kept.
    """
    return [f"{index}/{name.rsplit('/', 1)[-1].split(':', 1)[0]}" for index, name in enumerate(variable_names)]


def server_state(model: Any) -> list:
    """The variables of `model` kept on the server: its floating-point non-trainable ones (BatchNorm's statistics).

    Integer ones (a seed generator's state, counters) stay local: a round's mean of them means nothing.
    """
    if model is None:
        return []
    variables = getattr(model, "non_trainable_variables", None)
    if variables is None or isinstance(model, type):
        raise InvalidArgumentError(f"model: a Keras model (with non_trainable_variables), not {type(model).__name__}")
    return [v for v in variables if np.issubdtype(np.dtype(getattr(v.dtype, "as_numpy_dtype", v.dtype)), np.floating)]


def local_learning_rate(config: Mapping[str, Any] | None) -> float:
    """The learning rate the local optimizer object reports: the config's when it is a number, else Keras's 0.001.

    Only shown (the step runs on the server); a schedule's dict stays in the config.
    """
    learning_rate = (config or {}).get("learning_rate", 0.001)
    return float(learning_rate) if isinstance(learning_rate, (int, float)) else 0.001
