"""tf-keras `RMSprop`: slots velocity, momentum (momentum > 0) and average_gradient (centered)."""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import Array

from optserve.server.engine.config import RMSpropConfig
from optserve.server.engine.core import Context, Core, SlotSpec
from optserve.server.engine.schedules import f32_constant
from optserve.wire.layout import FlatLayout


def _slots(config: RMSpropConfig, layout: FlatLayout) -> dict[str, SlotSpec]:
    slots = {"velocity": SlotSpec(layout)}
    if config.momentum > 0:
        slots["momentum"] = SlotSpec(layout)
    if config.centered:
        slots["average_gradient"] = SlotSpec(layout)
    return slots


def _update(ctx: Context, config: RMSpropConfig, param: Array, slots: Mapping[str, Array],
            scalars: Mapping[str, Array]) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """vel = rho vel + (1 - rho) g^2; inc = lr g / sqrt(vel [- avg^2] + eps); theta -= inc, or via momentum.

    A sparse gradient's increment exists at its rows only (tf-keras gathers
    the denominator there), so the other rows never see 0 * rsqrt(0).
    """
    rho, rate = f32_constant(config.rho), f32_constant(1 - config.rho)
    g = ctx.g
    velocity = rho * slots["velocity"] + rate * jnp.square(g)
    new = {"velocity": velocity}
    if config.centered:
        average = new["average_gradient"] = rho * slots["average_gradient"] + rate * g
        denominator = velocity - jnp.square(average) + f32_constant(config.epsilon)
    else:
        denominator = velocity + f32_constant(config.epsilon)
    increment = ctx.lr * g * jax.lax.rsqrt(denominator)
    if ctx.touched is not True:
        increment = jnp.where(ctx.touched, increment, 0)
    if config.momentum > 0:
        momentum = new["momentum"] = f32_constant(config.momentum) * slots["momentum"] + increment
        return param + -momentum, new, dict(scalars)
    return param + -increment, new, dict(scalars)


CORE = Core(_slots, _update)
