"""The exchange from inside a jitted JAX step: an ordered `io_callback`, so steps never overlap or reorder.

With non-trainable state on the server, Keras's JAX step hands the optimizer
only the gradients: the step's new statistics are in the state `train_step`
returns. So the optimizer's callback keeps the gradients (`stash_in_step`) and
a wrapped `train_step` pushes them with those statistics (`exchange_after_step`).
"""

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import io_callback


def _shapes(variables: Sequence[Any]) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(tuple(v.shape), np.dtype(v.dtype)) for v in variables]


def exchange_in_step(exchange: Callable[..., list[np.ndarray]], grads: Sequence[Any], variables: Sequence[Any],
                     state_variables: Sequence[Any] = ()) -> None:
    """Calls `exchange(*grads)` on the host from the traced step and assigns the arrays it returns to `variables`.

    No state here: inside the optimizer the step's new statistics are out of reach (`exchange_after_step`).
    """
    if state_variables:
        raise ValueError("state_variables: on JAX the state goes through exchange_after_step")
    values = io_callback(exchange, _shapes(variables), *grads, ordered=True)
    for variable, value in zip(variables, values):
        variable.assign(value)


def stash_in_step(stash: Callable[..., None], grads: Sequence[Any]) -> None:
    """Calls `stash(*grads)` on the host from the traced step, in order with the step's other callbacks."""
    def call(*arrays: np.ndarray) -> np.ndarray:
        stash(*arrays)
        return np.zeros((), np.int32)

    io_callback(call, jax.ShapeDtypeStruct((), np.int32), *grads, ordered=True)


def exchange_after_step(model: Any, state_variables: Sequence[Any],
                        exchange: Callable[..., list[np.ndarray]]) -> None:
    """Wraps `model.train_step`: after Keras's step, `exchange(*new values of state_variables)` returns the new
    trainable weights (in `model.trainable_variables` order) then the state's values, which the step returns."""
    original = model.train_step
    positions = [next(i for i, v in enumerate(model.non_trainable_variables) if v is variable)
                 for variable in state_variables]

    def train_step(state: tuple, data: Any) -> tuple:
        logs, (trainable, non_trainable, optimizer_variables, metrics_variables) = original(state, data)
        kept = [non_trainable[i] for i in positions]
        values = io_callback(exchange, _shapes([*trainable, *kept]), *kept, ordered=True)
        non_trainable = list(non_trainable)
        for i, value in zip(positions, values[len(trainable):]):
            non_trainable[i] = value
        return logs, (list(values[:len(trainable)]), non_trainable, optimizer_variables, metrics_variables)

    model.train_step = train_step


def outside_the_step() -> contextlib.AbstractContextManager:
    """Where `build` talks to the server: as it is, since Keras builds the optimizer before it traces the step."""
    return contextlib.nullcontext()
