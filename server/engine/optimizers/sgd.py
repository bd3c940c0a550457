"""tf-keras `SGD`: slot m (always built, tf-keras's own quirk), momentum and Nesterov."""

from collections.abc import Mapping

from jax import Array

from optserve.server.engine.config import SGDConfig
from optserve.server.engine.core import Context, Core, SlotSpec
from optserve.server.engine.schedules import f32_constant
from optserve.wire.layout import FlatLayout


def _slots(config: SGDConfig, layout: FlatLayout) -> dict[str, SlotSpec]:
    return {"m": SlotSpec(layout)}


def _update(ctx: Context, config: SGDConfig, param: Array, slots: Mapping[str, Array],
            scalars: Mapping[str, Array]) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """m = -g lr + m momentum; theta += m, or with nesterov theta += -g lr + m momentum (the new m)."""
    momentum = f32_constant(config.momentum)
    step = -ctx.g * ctx.lr
    m = step + slots["m"] * momentum  # the sparse branch's m * momentum + rows is the same sum
    if not config.nesterov:
        return param + m, {"m": m}, dict(scalars)
    dense = param + (step + m * momentum)
    sparse = (param + step) + m * momentum  # scatter the rows into theta, then add m * momentum
    return ctx.segments.where(ctx.is_sparse, sparse, dense), {"m": m}, dict(scalars)


CORE = Core(_slots, _update, padding_stays_zero=("m",))
