"""tf-keras `Adadelta`: slots accumulated_grad and accumulated_delta_var."""

from collections.abc import Mapping

import jax.numpy as jnp
from jax import Array

from optserve.server.engine.config import AdadeltaConfig
from optserve.server.engine.core import Context, Core, SlotSpec
from optserve.server.engine.schedules import f32_constant
from optserve.wire.layout import FlatLayout


def _slots(config: AdadeltaConfig, layout: FlatLayout) -> dict[str, SlotSpec]:
    return {"accumulated_grad": SlotSpec(layout), "accumulated_delta_var": SlotSpec(layout)}


def _update(ctx: Context, config: AdadeltaConfig, param: Array, slots: Mapping[str, Array],
            scalars: Mapping[str, Array]) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """ag = rho ag + (1 - rho) g^2; delta = -rms(adv) g / rms(ag); adv likewise with delta; theta += lr delta."""
    g, epsilon = ctx.g, f32_constant(config.epsilon)
    rho, rate = f32_constant(config.rho), f32_constant(1 - config.rho)
    grad, delta_var = slots["accumulated_grad"], slots["accumulated_delta_var"]
    dense = rho * grad + rate * g * g
    sparse = (grad + f32_constant(config.rho - 1) * grad) + rate * jnp.square(g)  # decay whole, scatter rows
    grad = ctx.segments.where(ctx.is_sparse, sparse, dense)
    delta = -jnp.sqrt(delta_var + epsilon) * g / jnp.sqrt(grad + epsilon)
    delta_var = rho * delta_var + rate * delta * delta
    return param + ctx.lr * delta, {"accumulated_grad": grad, "accumulated_delta_var": delta_var}, dict(scalars)


CORE = Core(_slots, _update)
