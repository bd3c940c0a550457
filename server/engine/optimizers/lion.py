"""tf-keras `Lion`: slot m."""

from collections.abc import Mapping

import jax.numpy as jnp
from jax import Array

from optserve.server.engine.config import LionConfig
from optserve.server.engine.core import Context, Core, SlotSpec
from optserve.server.engine.schedules import f32_constant
from optserve.wire.layout import FlatLayout


def _slots(config: LionConfig, layout: FlatLayout) -> dict[str, SlotSpec]:
    return {"m": SlotSpec(layout)}


def _update(ctx: Context, config: LionConfig, param: Array, slots: Mapping[str, Array],
            scalars: Mapping[str, Array]) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """theta -= lr sign(b1 m + (1 - b1) g); m = b2 m + (1 - b2) g (sparse: tf-keras's own order through m)."""
    beta_1, beta_2, g, m = f32_constant(config.beta_1), f32_constant(config.beta_2), ctx.g, slots["m"]
    dense_param = param - ctx.lr * jnp.sign(m * beta_1 + g * (1.0 - beta_1))
    dense_m = m * beta_2 + g * (1.0 - beta_2)
    buffer = m * beta_1 + g * (1.0 - beta_1)  # the sparse branch keeps this in m, then rescales it
    sparse_param = param - ctx.lr * jnp.sign(buffer)
    sparse_m = buffer * beta_2 / beta_1 + g * (1.0 - beta_2 / beta_1)
    where = ctx.segments.where
    return where(ctx.is_sparse, sparse_param, dense_param), {"m": where(ctx.is_sparse, sparse_m, dense_m)}, \
        dict(scalars)


CORE = Core(_slots, _update, padding_stays_zero=("m",))
