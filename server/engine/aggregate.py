"""Sync-round aggregation on the device: dense gradients summed in a fixed order into reused buffers.

`sum_in_order` adds the workers' gradients in the order given (the caller
passes sorted worker ids), so the float32 result does not depend on arrival
order, and divides once for a mean: ((g0 + g1) + g2) / 3, exactly the float
operations of the host loop it replaces. It is jitted with the previous
round's result donated, so XLA writes the new sum into the same device
buffers: one fused pass over the gradients, no fresh allocation per round.
"""

from collections.abc import Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import Array


@partial(jax.jit, donate_argnums=0, static_argnames="mean", keep_unused=True)
def _sum_in_order(out: dict[str, Array], grads: tuple[dict[str, Array], ...], count: Array,
                  mean: bool) -> dict[str, Array]:
    del out  # only its buffers are used: donated, they receive the result
    total = {}
    for name in grads[0]:
        value = grads[0][name].astype(jnp.float32)
        for grad in grads[1:]:
            value = value + grad[name].astype(jnp.float32)
        total[name] = value / _spread(count, value.shape) if mean else value
    return total


def _spread(scalar: Array, shape: tuple[int, ...]) -> Array:
    """`scalar` as a full array that XLA cannot see through.

    XLA rewrites `x / broadcast(c)` as `x * broadcast(1 / c)`, which is off
    by an ulp for a third of the values; dividing by a materialized array
    keeps the IEEE division the host loop did.
    """
    return jax.lax.optimization_barrier(jnp.broadcast_to(scalar, shape))


def sum_in_order(out: Mapping[str, Array], grads: Sequence[Mapping[str, Array]], mean: bool) -> dict[str, Array]:
    """The sum (or mean) of `grads`, tensor by tensor, added in the order given, as float32.

    Args:
      out: float32 arrays of the tensors' shapes, keyed like every entry of
        `grads`; they are donated (invalid after the call) and their buffers
        hold the result. The previous call's result is meant to be passed back.
      grads: one dict per worker, in the order to add them; dense arrays of
        any float dtype.
      mean: divide the sum by `len(grads)`.
    """
    return _sum_in_order(dict(out), tuple(dict(g) for g in grads), jnp.float32(len(grads)), mean)


def zeros_like_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Array]:
    """Fresh float32 buffers for `sum_in_order`'s `out`."""
    return {name: jnp.zeros(shape, jnp.float32) for name, shape in shapes.items()}
