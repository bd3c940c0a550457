"""tf-keras `Ftrl`: slots accumulator (starting at `initial_accumulator_value`) and linear.

tf-keras runs the same code for a sparse gradient, densified, so every row
moves (the l2 shrinkage reaches rows without a gradient too).
"""

from collections.abc import Mapping

import jax.numpy as jnp
from jax import Array

from optserve.server.engine.config import FtrlConfig
from optserve.server.engine.core import Context, Core, SlotSpec
from optserve.server.engine.schedules import f32_constant
from optserve.wire.layout import FlatLayout


def _slots(config: FtrlConfig, layout: FlatLayout) -> dict[str, SlotSpec]:
    return {"accumulator": SlotSpec(layout, config.initial_accumulator_value), "linear": SlotSpec(layout)}


def _update(ctx: Context, config: FtrlConfig, param: Array, slots: Mapping[str, Array],
            scalars: Mapping[str, Array]) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """FTRL-proximal: linear += g' - (acc'^-p - acc^-p) / lr * theta; theta = (clip(linear, l1) - linear) / quad."""
    lr, g = ctx.lr, ctx.g
    power = f32_constant(-config.learning_rate_power)
    l2 = f32_constant(config.l2_regularization_strength) + f32_constant(config.beta) / (f32_constant(2.0) * lr)
    grad_to_use = g + f32_constant(2 * config.l2_shrinkage_regularization_strength) * param
    accumulator = slots["accumulator"]
    new_accumulator = accumulator + jnp.square(g)
    linear = slots["linear"] + (grad_to_use - (jnp.power(new_accumulator, power) - jnp.power(accumulator, power))
                                / lr * param)
    quadratic = jnp.power(new_accumulator, power) / lr + 2 * l2
    l1 = f32_constant(config.l1_regularization_strength)
    new_param = (jnp.clip(linear, -l1, l1) - linear) / quadratic
    return new_param, {"accumulator": new_accumulator, "linear": linear}, dict(scalars)


CORE = Core(_slots, _update)
