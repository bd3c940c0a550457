"""tf-keras `Adamax`: slots m and u (the exponentially weighted infinity norm)."""

from collections.abc import Mapping

import jax.numpy as jnp
from jax import Array

from optserve.server.engine.config import AdamaxConfig
from optserve.server.engine.core import Context, Core, SlotSpec, local_step, moment, power
from optserve.server.engine.schedules import f32_constant
from optserve.wire.layout import FlatLayout


def _slots(config: AdamaxConfig, layout: FlatLayout) -> dict[str, SlotSpec]:
    return {"m": SlotSpec(layout), "u": SlotSpec(layout)}


def _update(ctx: Context, config: AdamaxConfig, param: Array, slots: Mapping[str, Array],
            scalars: Mapping[str, Array]) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """m += (g - m)(1 - b1); u = max(b2 u, |g|); theta -= lr m / ((1 - b1^t)(u + eps)).

    The sparse branch's u (decayed whole, rows raised to |g|) is the same
    maximum, as u >= 0.
    """
    beta_1_power = power(config.beta_1, local_step(ctx))
    m = moment(ctx, slots["m"], ctx.g, 1 - config.beta_1)
    u = jnp.maximum(f32_constant(config.beta_2) * slots["u"], jnp.abs(ctx.g))
    new_param = param - (ctx.lr * m) / ((1 - beta_1_power) * (u + f32_constant(config.epsilon)))
    return new_param, {"m": m, "u": u}, dict(scalars)


CORE = Core(_slots, _update, padding_stays_zero=("m", "u"))
