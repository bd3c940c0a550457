"""What one optimizer class of the family is: its slots and its `update_step`, over the engine's flat state.

tf-keras writes each class as `build` (which slots) and `update_step` (how
one variable moves); the shared pipeline around them (learning rate, clip,
duplicate sparse rows, weight decay, EMA, overwrite, iterations) is written
once, in `pipeline`. A `Core` is those two functions, pure, over flat
float32 buffers: each slot one buffer in a `FlatLayout` (the parameters'
layout, or its own for a slot of another shape, such as Adafactor's row and
column factors), and the optimizer-wide scalars (Nadam's `u_product`).
"""

from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax.numpy as jnp
from jax import Array

from optserve.server.engine.schedules import f32_constant
from optserve.wire.layout import FlatLayout

if TYPE_CHECKING:
    from optserve.server.engine.pipeline import Segments


class SlotSpec(NamedTuple):
    """One slot a class builds: its layout (the parameters' unless it has its own shapes) and initial value."""

    layout: FlatLayout
    value: float = 0.0  # inside the tensors; padding is always 0 (Keras `initial_value`, e.g. Adagrad's 0.1)


class Context(NamedTuple):
    """What the pipeline hands every `update`: one step's inputs, after clipping, deduplication and decay."""

    segments: "Segments"  # per-tensor values over the flat buffers
    layout: FlatLayout  # of the parameters
    lr: Array  # float32 (): the learning rate of this step (schedule at k, or the constant)
    k: Array  # int32 (): iterations before this step; Keras's local_step is k + 1
    g: Array  # float32 (size,): clipped gradient, sparse rows summed in place, 0 elsewhere and in padding
    is_sparse: Array | bool  # where the tensors whose gradient is sparse lie ((blocks, 1) or a Python bool)
    touched: Array | bool  # float32-layout bool (size,): elements a gradient reaches (a sparse one: its rows)
    present: frozenset[str]  # the tensors that have a gradient this step


Update = Callable[[Context, Any, Array, Mapping[str, Array], Mapping[str, Array]],
                  tuple[Array, dict[str, Array], dict[str, Array]]]
"""`update(ctx, config, param, slots, scalars) -> (param, slots, scalars)`, all flat float32 buffers."""


class Core(NamedTuple):
    """One tf-keras optimizer class as pure functions: `build` and `update_step`.

    `slots(config, layout)` names the slots (tf-keras's names, in build
    order) with their layout and initial value; `update` is one step of
    every tensor at once. Tensors without a gradient, and the padding of the
    parameters' layout, are restored by the pipeline for slots in that
    layout; a slot in its own layout is the core's to keep (see Adafactor).
    """

    slots: Callable[[Any, FlatLayout], dict[str, SlotSpec]]
    update: Update
    scalars: Mapping[str, float] = {}  # optimizer-wide float32 state and its initial value
    padding_stays_zero: Collection[str] = ()  # slots whose padding `update` provably keeps 0 (no mask needed)


def moment(ctx: Context, value: Array, target: Array, rate: float | Array) -> Array:
    """value + (target - value) * rate, in the float order of tf-keras's dense or sparse branch.

    A Python `rate` (Adam's `1 - self.beta_1`) is taken in double, then
    float32; an array one (Nadam's `1 - tf.cast(beta_1)`) is used as it is.
    The sparse branch (Adam, Nadam, Adamax's m) decays the whole slot, then
    scatter-adds the rows; adding the zeros of the densified gradient
    elsewhere is exact.
    """
    rate = f32_constant(rate) if isinstance(rate, int | float) else rate
    return ctx.segments.where(ctx.is_sparse, (value + -value * rate) + target * rate, value + (target - value) * rate)


def local_step(ctx: Context) -> Array:
    """Keras's `tf.cast(iterations + 1, float32)`."""
    return ctx.k.astype(jnp.float32) + 1


def power(base: float, exponent: Array) -> Array:
    """`tf.pow(tf.cast(base, float32), exponent)`."""
    return jnp.power(f32_constant(base), exponent)
