"""tf-keras `Adafactor`: slots r and c (row and column factors of each tensor of rank >= 2) and v.

Its per-tensor reductions (the factors' means, the RMS of each tensor and
update) run tensor by tensor over slices of the flat buffers, so its trace
grows with the number of tensors (unlike the element-wise classes). `r` and
`c` live in layouts of their own, over the tensors of rank >= 2; tensors
without a gradient keep them, as the core does that itself.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import Array

from optserve.server.engine.config import AdafactorConfig
from optserve.server.engine.core import Context, Core, SlotSpec, local_step
from optserve.server.engine.schedules import f32_constant
from optserve.wire.layout import FlatLayout


def factor_layouts(layout: FlatLayout) -> tuple[FlatLayout, FlatLayout]:
    """The layouts of r (shape[:-1]) and c (shape[:-2] + shape[-1:]) over the tensors of rank >= 2."""
    factored = {name: shape for name, shape in layout.shapes.items() if len(shape) >= 2}
    return (FlatLayout({name: shape[:-1] for name, shape in factored.items()}),
            FlatLayout({name: (*shape[:-2], shape[-1]) for name, shape in factored.items()}))


def _slots(config: AdafactorConfig, layout: FlatLayout) -> dict[str, SlotSpec]:
    rows, columns = factor_layouts(layout)
    return {"r": SlotSpec(rows), "c": SlotSpec(columns), "v": SlotSpec(layout)}


def _rms(x: Array) -> Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _piece(flat: Array, layout: FlatLayout, name: str) -> Array:
    offset = layout.offsets[name]
    return flat[offset:offset + layout.sizes[name]].reshape(layout.shapes[name])


def _put(flat: Array, layout: FlatLayout, name: str, value: Array) -> Array:
    return jax.lax.dynamic_update_slice(flat, value.reshape(-1).astype(flat.dtype), (layout.offsets[name],))


def _update(ctx: Context, config: AdafactorConfig, param: Array, slots: Mapping[str, Array],
            scalars: Mapping[str, Array]) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """Factored second moments; the update's RMS is clipped; the step scales with the tensor's RMS."""
    layout = ctx.layout
    rows, columns = factor_layouts(layout)
    t = local_step(ctx)
    lr = ctx.lr
    if isinstance(config.learning_rate, int | float) and config.relative_step:
        lr = jnp.minimum(lr, jax.lax.rsqrt(t))
    rho_t = jnp.minimum(lr, jax.lax.rsqrt(t))
    beta_2_t = 1 - jnp.power(t, f32_constant(config.beta_2_decay))
    epsilon_1, epsilon_2 = f32_constant(config.epsilon_1), f32_constant(config.epsilon_2)
    threshold = f32_constant(config.clip_threshold)
    r, c, v, new_param = slots["r"], slots["c"], slots["v"], param
    for name in layout.shapes:
        if name not in ctx.present or layout.sizes[name] == 0:
            continue
        theta, g = _piece(param, layout, name), _piece(ctx.g, layout, name)
        alpha_t = jnp.maximum(epsilon_2, _rms(theta)) * rho_t
        squared = jnp.square(g) + epsilon_1
        if len(layout.shapes[name]) >= 2:
            r_t = beta_2_t * _piece(r, rows, name) + (1 - beta_2_t) * jnp.mean(squared, axis=-1)
            c_t = beta_2_t * _piece(c, columns, name) + (1 - beta_2_t) * jnp.mean(squared, axis=-2)
            v_t = jnp.expand_dims(r_t / jnp.mean(r_t, axis=-1, keepdims=True), -1) * jnp.expand_dims(c_t, -2)
            r, c = _put(r, rows, name, r_t), _put(c, columns, name, c_t)
        else:
            v_t = beta_2_t * _piece(v, layout, name) + (1 - beta_2_t) * squared
        u_t = g * jax.lax.rsqrt(v_t)
        u_hat = u_t / jnp.maximum(f32_constant(1.0), _rms(u_t) / threshold)
        v, new_param = _put(v, layout, name, v_t), _put(new_param, layout, name, theta + -alpha_t * u_hat)
    return new_param, {"r": r, "c": c, "v": v}, dict(scalars)


CORE = Core(_slots, _update, padding_stays_zero=("v",))
