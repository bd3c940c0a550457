"""tf-keras `Adagrad`: slot accumulator, starting at `initial_accumulator_value`."""

from collections.abc import Mapping

import jax.numpy as jnp
from jax import Array

from optserve.server.engine.config import AdagradConfig
from optserve.server.engine.core import Context, Core, SlotSpec
from optserve.server.engine.schedules import f32_constant
from optserve.wire.layout import FlatLayout


def _slots(config: AdagradConfig, layout: FlatLayout) -> dict[str, SlotSpec]:
    return {"accumulator": SlotSpec(layout, config.initial_accumulator_value)}


def _update(ctx: Context, config: AdagradConfig, param: Array, slots: Mapping[str, Array],
            scalars: Mapping[str, Array]) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """acc += g^2; theta -= lr g / sqrt(acc + eps); a sparse gradient moves its rows of theta only."""
    g = ctx.g
    accumulator = slots["accumulator"] + g * g
    new_param = param - ctx.lr * g / jnp.sqrt(accumulator + f32_constant(config.epsilon))
    if ctx.touched is not True:
        new_param = jnp.where(ctx.touched, new_param, param)
    return new_param, {"accumulator": accumulator}, dict(scalars)


CORE = Core(_slots, _update)
