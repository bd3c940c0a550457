"""optserve for tf-keras (Keras 2, what R's keras drives): `RemoteOptimizer`, a tf_keras.optimizers.Optimizer.

    import tf_keras
    from optserve.tf_keras import RemoteOptimizer
    model.compile(optimizer=RemoteOptimizer("127.0.0.1:50051", "mnist", {"learning_rate": 1e-3}), loss=...)
    model.fit(x, y)           # a tf.function step: it pushes the gradients and assigns the pulled weights

The Keras 2.11+ optimizer (not `tf_keras.optimizers.legacy`). The exchange runs on
the host from inside the `tf.function` step through `tf.py_function`, so the
model must not be XLA-compiled (tf-keras's default, `jit_compile=None`, is not).
Needs the `tensorflow` extra and tf-keras (`pip install "optserve[tensorflow]"`,
then `pip install --no-deps tf-keras==2.21.0`: its own requirement would pull the full `tensorflow` build).
"""

import types
from collections.abc import Mapping
from typing import Any

import tf_keras

from optserve.client import Client
from optserve.keras_worker import STALE_RETRIES, KerasWorker, RemoteOptimizerMixin, local_learning_rate, server_state
from optserve.keras_worker.tf_step import exchange_in_step

__all__ = ["RemoteOptimizer", "STALE_RETRIES"]


class RemoteOptimizer(RemoteOptimizerMixin, tf_keras.optimizers.Optimizer):
    """A tf-keras optimizer whose state and step live on an optserve server (tf-keras Adam's numbers by default).

    As `optserve.keras.RemoteOptimizer`: `client` a `Client` or an address;
    `name` the optimizer on the server, created (or attached to) from the
    trainable variables, named "0/kernel", "1/bias", ... (position and the
    variable's last name part, without ":0"), with `config` and
    `create_or_mode_options`; every worker starts from the server's weights.
    Clipping, weight decay and EMA belong in `config` (they run on the server);
    a variable whose gradient is None is skipped, as tf-keras skips it.
    `model` keeps the model's floating-point non-trainable variables
    (BatchNorm's moving statistics) on the server too, as in `optserve.keras`.
    """

    def __init__(self, client: Client | str, name: str, config: Mapping[str, Any] | None = None,
                 optimizer: str = "Adam", *, worker_id: str | None = None, model: Any = None,
                 **create_or_mode_options: Any):
        super().__init__(name="optserve", jit_compile=False)
        self._held = types.SimpleNamespace(state=server_state(model))  # not tracked: the model's own variables
        self._learning_rate = self._build_learning_rate(local_learning_rate(config))
        self._worker = KerasWorker(client, name, config, optimizer, worker_id, create_or_mode_options, "tf-keras")

    def build(self, var_list: list) -> None:
        """Once (tf-keras calls it eagerly, in an init scope): create or attach, and start from the server's weights."""
        if getattr(self, "_built", False):
            return
        super().build(var_list)
        state = self._held.state
        pulled = self._worker.attach([v.name for v in var_list], list(var_list), [v.name for v in state], state)
        for variable, value in zip([*var_list, *state], pulled):
            variable.assign(value)
        self._built = True

    def _internal_apply_gradients(self, grads_and_vars: list) -> Any:
        """One step on the server, called from the host by the tf.function step; returns the iteration counter."""
        grads, variables = zip(*grads_and_vars)
        names = [self._worker.names[self._index_dict[self._var_key(v)]] for v in variables]
        count = len(grads)
        exchange_in_step(lambda *arrays: self._worker.exchange(names, arrays[:count], arrays[count:]), grads,
                         variables, self._held.state)
        return self.iterations.assign_add(1)
