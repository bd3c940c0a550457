"""tf-keras `Adam` (and `AdamW`): slots m, v (and vhat with amsgrad); spec/keras-adam.md.

Keras adds epsilon to the square root of the *uncorrected* second moment (the
paper's "epsilon hat"), so the textbook / optax / PyTorch epsilon equals
``epsilon / sqrt(1 - beta_2**t)`` here; `adaptive_epsilon` (tf-keras 2.21)
adds ``epsilon * sqrt(1 - beta_2**t)`` instead, PyTorch's placement.
"""

from collections.abc import Mapping

import jax.numpy as jnp
from jax import Array

from optserve.server.engine.config import AdamConfig
from optserve.server.engine.core import Context, Core, SlotSpec, local_step, moment, power
from optserve.server.engine.schedules import f32_constant
from optserve.wire.layout import FlatLayout


def _slots(config: AdamConfig, layout: FlatLayout) -> dict[str, SlotSpec]:
    slots = {"m": SlotSpec(layout), "v": SlotSpec(layout)}
    if config.amsgrad:
        slots["vhat"] = SlotSpec(layout)
    return slots


def _update(ctx: Context, config: AdamConfig, param: Array, slots: Mapping[str, Array],
            scalars: Mapping[str, Array]) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """m, v (vhat = max(vhat, v)); theta -= m * alpha / (sqrt(v) + epsilon_hat), alpha = lr sqrt(1 - b2^t) / (1 - b1^t)."""
    t = local_step(ctx)
    beta_1_power, beta_2_power = power(config.beta_1, t), power(config.beta_2, t)
    alpha = ctx.lr * jnp.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    epsilon_hat = f32_constant(config.epsilon)
    if config.adaptive_epsilon:
        epsilon_hat = epsilon_hat * jnp.sqrt(1 - beta_2_power)
    m = moment(ctx, slots["m"], ctx.g, 1 - config.beta_1)
    v = moment(ctx, slots["v"], jnp.square(ctx.g), 1 - config.beta_2)
    new = {"m": m, "v": v}
    if config.amsgrad:
        v = new["vhat"] = jnp.maximum(slots["vhat"], v)
    return param - (m * alpha) / (jnp.sqrt(v) + epsilon_hat), new, dict(scalars)


CORE = Core(_slots, _update, padding_stays_zero=("m", "v", "vhat"))  # g is 0 in the padding
