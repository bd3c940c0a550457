"""The exchange from inside a `tf.function` step (Keras 3's TensorFlow backend, tf-keras): `tf.py_function`.

`tf.py_function` is a stateful op, so the function's automatic control
dependencies keep the steps in order. XLA cannot compile it: the step must be
compiled with `jit_compile=False` (what Keras picks on a machine without a GPU).
`tf.IndexedSlices` gradients reach the host as they are and are pushed as sparse rows.
"""

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf


def exchange_in_step(exchange: Callable[..., list[np.ndarray]], grads: Sequence[Any], variables: Sequence[Any],
                     state_variables: Sequence[Any] = ()) -> None:
    """Calls `exchange(*grads, *state values)` on the host from the traced step and assigns the arrays it
    returns to `variables`, then to `state_variables` (read after the forward pass: the step's own statistics)."""
    inputs = [*grads, *(tf.convert_to_tensor(v) for v in state_variables)]
    targets = [*variables, *state_variables]
    values = tf.py_function(exchange, inputs, [tf.as_dtype(v.dtype) for v in targets])
    for variable, value in zip(targets, values):
        value.set_shape(variable.shape)
        variable.assign(value)


def outside_the_step() -> contextlib.AbstractContextManager:
    """Where `build` talks to the server: eagerly, lifted out of the tf.function being traced (`tf.init_scope`)."""
    return tf.init_scope()
