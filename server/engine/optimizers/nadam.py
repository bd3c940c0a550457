"""tf-keras `Nadam`: slots m and v, and the optimizer-wide `u_product` (the running momentum schedule)."""

from collections.abc import Mapping

import jax.numpy as jnp
from jax import Array

from optserve.server.engine.config import NadamConfig
from optserve.server.engine.core import Context, Core, SlotSpec, local_step, moment
from optserve.server.engine.schedules import f32_constant
from optserve.wire.layout import FlatLayout


def _slots(config: NadamConfig, layout: FlatLayout) -> dict[str, SlotSpec]:
    return {"m": SlotSpec(layout), "v": SlotSpec(layout)}


def _update(ctx: Context, config: NadamConfig, param: Array, slots: Mapping[str, Array],
            scalars: Mapping[str, Array]) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """u_t = b1 (1 - 0.5 * 0.96^t); u_product *= u_t once per step; m_hat mixes m and g; theta -= lr m_hat / (sqrt(v_hat) + eps).

    tf-keras caches the product across the variables of one step; it is
    part of the state (checkpointed), computed here once per step.
    """
    t = local_step(ctx)
    decay, beta_1, beta_2 = f32_constant(0.96), f32_constant(config.beta_1), f32_constant(config.beta_2)
    u_t = beta_1 * (1.0 - 0.5 * jnp.power(decay, t))
    u_t_1 = beta_1 * (1.0 - 0.5 * jnp.power(decay, t + 1))
    u_product_t = scalars["u_product"] * u_t
    u_product_t_1 = u_product_t * u_t_1
    beta_2_power = jnp.power(beta_2, t)
    g = ctx.g
    m = moment(ctx, slots["m"], g, 1 - beta_1)
    v = moment(ctx, slots["v"], jnp.square(g), 1 - beta_2)
    m_hat = u_t_1 * m / (1 - u_product_t_1) + (1 - u_t) * g / (1 - u_product_t)
    v_hat = v / (1 - beta_2_power)
    new_param = param - (m_hat * ctx.lr) / (jnp.sqrt(v_hat) + f32_constant(config.epsilon))
    return new_param, {"m": m, "v": v}, {**scalars, "u_product": u_product_t}


CORE = Core(_slots, _update, scalars={"u_product": 1.0}, padding_stays_zero=("m", "v"))
