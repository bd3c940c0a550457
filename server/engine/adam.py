"""tf-keras Adam as pure functions over a dict of named float32 tensors.

`init` builds an `AdamState`, `make_step` returns the (jitted) function that
applies one set of gradients, `finalize` copies the moving averages into the
parameters. The numerics are those of tf-keras 2.11+ `Adam` as written down in
spec/keras-adam.md, all in float32. Note the epsilon placement: Keras adds
epsilon to the square root of the *uncorrected* second moment (the paper's
"epsilon hat"), so the textbook / optax / PyTorch epsilon equals
``epsilon / sqrt(1 - beta_2**t)`` here, not `epsilon`.
"""

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from optserve.server.engine import schedules
from optserve.server.engine.config import AdamConfig
from optserve.server.engine.schedules import f32_constant
from optserve.server.errors import InvalidArgument

_INT32_MAX = int(np.iinfo(np.int32).max)


class SparseGrad(NamedTuple):
    """A gradient for some rows of a tensor, like Keras's `tf.IndexedSlices`."""

    indices: Array  # int32 (n,): rows of the tensor, 0 <= i < rows; duplicates are summed
    values: Array  # float32/float16/bfloat16 (n, *shape[1:]): row j is the gradient of row indices[j]


Grad = Array | SparseGrad
"""A dense gradient (any float dtype, the tensor's shape) or a `SparseGrad`."""


class AdamState(NamedTuple):
    """Everything one optimizer holds; a pytree of device arrays.

    The dicts are keyed by tensor name and hold float32 arrays of that tensor's shape.
    """

    iterations: Array  # int32 (): completed steps k; saturates at 2**31 - 1 instead of wrapping
    params: dict[str, Array]  # the variables theta
    m: dict[str, Array]  # first moments, zeros at init
    v: dict[str, Array]  # second moments (not bias-corrected), zeros at init
    vhat: dict[str, Array]  # running max of v; {} unless amsgrad
    ema: dict[str, Array]  # moving averages of theta; {} unless use_ema; starts as a copy of theta


def sparse_grad(indices: np.ndarray, values: np.ndarray) -> SparseGrad:
    """A `SparseGrad` on the default device, padded to a power-of-two number of rows.

    Padding rows have index 0 and value 0, which leaves every result
    unchanged (they add 0 to norms and sums), while the jitted step compiles
    once per bucket size instead of once per row count.

    Args:
      indices: integer (n,), each in [0, rows) of the target tensor (the
        caller checks the upper bound, which this function does not know).
      values: float (n, *shape[1:]).
    """
    indices, values = np.asarray(indices), np.asarray(values)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise InvalidArgument(f"indices: must be a 1-D integer array, got {indices.dtype} {indices.shape}")
    if values.ndim < 1 or values.shape[0] != indices.shape[0]:
        raise InvalidArgument(f"values: must have {indices.shape[0]} rows (one per index), got shape {values.shape}")
    if indices.size and (indices.min() < 0 or indices.max() > _INT32_MAX):
        raise InvalidArgument(f"indices: must be in [0, 2**31), got {indices.min()}..{indices.max()}")
    n = indices.shape[0]
    bucket = 1 << max(n - 1, 0).bit_length()
    padded_indices = np.zeros(bucket, np.int32)
    padded_indices[:n] = indices
    padded_values = np.zeros((bucket, *values.shape[1:]), values.dtype)
    padded_values[:n] = values
    return SparseGrad(jnp.asarray(padded_indices), jnp.asarray(padded_values))


def init(params: Mapping[str, np.ndarray | Array], config: AdamConfig) -> AdamState:
    """A fresh state for `params`, copied as float32 onto jax's default device.

    As in tf-keras (`add_variable_from_reference(var, "average", initial_value=var)`),
    the moving averages start as a copy of the initial parameters; Keras 3
    starts them at the first updated value instead (spec/keras-adam.md §2.3).
    """
    params = {name: jnp.array(value, dtype=jnp.float32, copy=True) for name, value in params.items()}
    return AdamState(
        iterations=jnp.zeros((), jnp.int32),
        params=params,
        m={name: jnp.zeros_like(p) for name, p in params.items()},
        v={name: jnp.zeros_like(p) for name, p in params.items()},
        vhat={name: jnp.zeros_like(p) for name, p in params.items()} if config.amsgrad else {},
        ema={name: jnp.array(p, copy=True) for name, p in params.items()} if config.use_ema else {},
    )


SLOTS = ("params", "m", "v", "vhat", "ema")  # the dict fields of AdamState


def export(state: AdamState) -> dict[str, dict[str, np.ndarray]]:
    """Host copies of every tensor of a state, by slot then tensor name (for checkpoints)."""
    return {slot: {name: np.array(value) for name, value in getattr(state, slot).items()} for slot in SLOTS}


def restore(iterations: int, slots: Mapping[str, Mapping[str, np.ndarray]]) -> AdamState:
    """The state that `export` captured, back on jax's default device."""
    return AdamState(
        iterations=jnp.asarray(iterations, jnp.int32),
        **{slot: {name: jnp.array(value, dtype=jnp.float32, copy=True) for name, value in slots.get(slot, {}).items()}
           for slot in SLOTS},  # a checkpoint has no entry for an empty slot (vhat without amsgrad)
    )


# --- stages of one step, in the order `_apply` runs them ----------------------


def _learning_rate(config: AdamConfig, k: Array) -> Array:
    """The lr of step k: the schedule at k, or the constant as Keras stores it (float32)."""
    lr = config.learning_rate
    if isinstance(lr, int | float):
        return f32_constant(lr)
    return schedules.learning_rate(lr, k)


def _on_values(grad: Grad, fn: Callable[[Array], Array]) -> Grad:
    """Apply `fn` to a dense gradient or to a sparse gradient's value rows."""
    return grad._replace(values=fn(grad.values)) if isinstance(grad, SparseGrad) else fn(grad)


def _as_float32(grad: Grad) -> Grad:
    return _on_values(grad, lambda x: jnp.asarray(x, jnp.float32))


def _values(grad: Grad) -> Array:
    return grad.values if isinstance(grad, SparseGrad) else grad


def _clip(config: AdamConfig, grads: dict[str, Grad]) -> dict[str, Grad]:
    """tf-keras `_clip_gradients`: clipnorm, else global_clipnorm, else clipvalue.

    Sparse gradients are clipped on their raw value rows, before duplicates
    are summed, as TF does on `IndexedSlices`.
    """
    if config.clipnorm is not None:  # tf.clip_by_norm, per tensor
        c = f32_constant(config.clipnorm)
        return {
            name: _on_values(g, lambda x: x * c / jnp.maximum(jnp.sqrt(jnp.sum(x * x)), c))
            for name, g in grads.items()
        }
    if config.global_clipnorm is not None:  # tf.clip_by_global_norm; NaN for a non-finite norm
        c = f32_constant(config.global_clipnorm)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(_values(g))) for g in grads.values()))
        scale = c * jnp.minimum(1 / norm, 1 / c) + (norm - norm)
        return {name: _on_values(g, lambda x: x * scale) for name, g in grads.items()}
    if config.clipvalue is not None:
        c = f32_constant(config.clipvalue)
        return {name: _on_values(g, lambda x: jnp.clip(x, -c, c)) for name, g in grads.items()}
    return grads


def _densify(grad: Grad, shape: tuple[int, ...]) -> Array:
    """A dense gradient; sparse rows with equal indices are summed (`_deduplicate_sparse_grad`)."""
    if isinstance(grad, SparseGrad):
        return jnp.zeros(shape, jnp.float32).at[grad.indices].add(grad.values)
    return grad


def _decay_weights(param: Array, weight_decay: float, lr: Array) -> Array:
    """Decoupled weight decay, before the Adam update: theta - theta * wd * lr."""
    return param - param * f32_constant(weight_decay) * lr


def _step_size(config: AdamConfig, lr: Array, k: Array) -> Array:
    """alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t), t = k + 1, betas via float32."""
    t = k.astype(jnp.float32) + 1
    beta_1_power = jnp.power(f32_constant(config.beta_1), t)
    beta_2_power = jnp.power(f32_constant(config.beta_2), t)
    return lr * jnp.sqrt(1 - beta_2_power) / (1 - beta_1_power)


def _moment(moment: Array, target: Array, rate: float, sparse: bool) -> Array:
    """moment + (target - moment) * rate, in the float order of tf-keras's dense or sparse branch.

    `rate` (1 - beta) is taken in double, then float32. The sparse branch
    decays the whole moment, then scatter-adds the rows; adding the zeros of
    the densified gradient elsewhere is exact.
    """
    rate = f32_constant(rate)
    if sparse:
        return (moment + -moment * rate) + target * rate
    return moment + (target - moment) * rate


def _adam_update(param: Array, m: Array, denominator_v: Array, alpha: Array, epsilon: float) -> Array:
    """theta - (m * alpha) / (sqrt(v) + epsilon), epsilon outside the root (epsilon hat)."""
    return param - (m * alpha) / (jnp.sqrt(denominator_v) + f32_constant(epsilon))


def _moving_average(average: Array, param: Array, momentum: float) -> Array:
    """EMA of the post-update parameter: mu * average + (1 - mu) * theta."""
    return f32_constant(momentum) * average + f32_constant(1 - momentum) * param


def _saturating_increment(k: Array) -> Array:
    return jnp.where(k == _INT32_MAX, k, k + 1)


def _check_grads(names: frozenset[str], state: AdamState, grads: Mapping[str, Grad]) -> None:
    """Refuse, while tracing, gradients that would silently broadcast or be ignored."""
    if not grads:
        raise InvalidArgument("gradients: empty; a step needs at least one gradient")
    for name, grad in grads.items():
        if name not in names:
            raise InvalidArgument(f"gradients[{name!r}]: no such tensor")
        shape, values = state.params[name].shape, _values(grad)
        if not jnp.issubdtype(values.dtype, jnp.floating):
            raise InvalidArgument(f"gradients[{name!r}].dtype: must be a float type, got {values.dtype}")
        if isinstance(grad, SparseGrad):
            wanted = (grad.indices.shape[0], *shape[1:])
            if not shape or grad.indices.ndim != 1 or values.shape != wanted:
                raise InvalidArgument(f"gradients[{name!r}].values.shape: must be {wanted}, got {values.shape}")
        elif values.shape != shape:
            raise InvalidArgument(f"gradients[{name!r}].shape: must be {shape}, got {values.shape}")


def _apply(config: AdamConfig, decayed: frozenset[str], state: AdamState, grads: Mapping[str, Grad]) -> AdamState:
    """One tf-keras `apply_gradients` call (spec/keras-adam.md §2.1, with §1 and §3).

    With k = state.iterations:
      1. lr = schedule(k), or the float32 constant;
      2. clip: clipnorm per tensor, else global_clipnorm, else clipvalue
         (sparse: on the raw value rows);
      3. sum duplicate sparse rows into a dense gradient;
      4. weight decay for the tensors in `decayed`: theta -= theta * wd * lr;
      5. Adam with t = k + 1 (AMSGrad: divide by sqrt of the running max of v);
      6. EMA of the updated theta;
      7. every `ema_overwrite_frequency`-th step (k + 1 divisible): theta = EMA;
      8. iterations = k + 1, saturating.
    Tensors missing from `grads` keep their parameters, moments and average,
    as tf-keras skips variables whose gradient is None.
    """
    k = state.iterations
    lr = _learning_rate(config, k)
    grads = _clip(config, {name: _as_float32(g) for name, g in grads.items()})
    alpha = _step_size(config, lr, k)
    params, m, v, vhat, ema = (dict(t) for t in (state.params, state.m, state.v, state.vhat, state.ema))
    for name, grad in grads.items():
        sparse = isinstance(grad, SparseGrad)
        g = _densify(grad, params[name].shape)
        param = _decay_weights(params[name], config.weight_decay, lr) if name in decayed else params[name]
        m[name] = _moment(m[name], g, 1 - config.beta_1, sparse)
        v[name] = _moment(v[name], jnp.square(g), 1 - config.beta_2, sparse)
        if config.amsgrad:
            vhat[name] = jnp.maximum(vhat[name], v[name])
        params[name] = _adam_update(param, m[name], vhat[name] if config.amsgrad else v[name], alpha, config.epsilon)
        if config.use_ema:
            ema[name] = _moving_average(ema[name], params[name], config.ema_momentum)
    iterations = _saturating_increment(k)
    if config.use_ema and config.ema_overwrite_frequency:
        overwrite = iterations % config.ema_overwrite_frequency == 0
        for name in grads:
            params[name] = jnp.where(overwrite, ema[name], params[name])
    return AdamState(iterations, params, m, v, vhat, ema)


def make_step(config: AdamConfig, names: Sequence[str], decayed: Collection[str] | None = None,
              ) -> Callable[[AdamState, dict[str, Grad]], AdamState]:
    """The function applying one set of gradients: `step(state, grads) -> new state`.

    `config` is a constant of the trace; the lr, the bias corrections and the
    EMA overwrite test are computed from `state.iterations` inside, so new
    steps never recompile (only a new set of gradient names, shapes, dtypes
    or sparse buckets does). Unless `config.jit_compile` is False the function
    is jitted with the state donated: the caller's `state` is invalid after the
    call, and XLA updates its buffers in place.

    Un-jitted, the step runs tf-keras's float32 operations one by one; on CPU
    (jax 0.10.2) it reproduced the conformance trajectories bit for bit, but
    for the order of the global-norm sum. Jitted, XLA fuses multiply-adds,
    which moves results by a few ulps (under 3% of the conformance tolerance).

    Args:
      config: the optimizer's settings.
      names: the tensor names of the state.
      decayed: the names that weight decay applies to. None matches
        `exclude_from_weight_decay` here with `re.search`, in-process and
        unbounded: for trusted configs only (the server passes the set that
        `optserve.server.patterns` computed with a time bound).

    Returns:
      `step(state, grads)`, where `grads` maps some or all of `names` to a
      dense gradient (any float dtype, cast to float32) or a `SparseGrad`.
      It raises `InvalidArgument` for an unknown name, a wrong shape or a
      non-float dtype, before touching the state.
    """
    known, decayed = frozenset(names), _decayed(config, names, decayed)

    def step(state: AdamState, grads: dict[str, Grad]) -> AdamState:
        _check_grads(known, state, grads)
        return _apply(config, decayed, state, grads)

    return jax.jit(step, donate_argnums=0) if config.jit_compile else step


def make_checked_step(config: AdamConfig, names: Sequence[str], decayed: Collection[str] | None = None,
                      ) -> Callable[[AdamState, dict[str, Grad]], tuple[AdamState, Array]]:
    """Like `make_step`, but keeps the input state and reports which tensors the step left finite.

    `step(state, grads) -> (new_state, finite)`: `finite[i]` is true when every
    new value of tensor `names[i]` (params, m, v, vhat, ema) is finite. The
    state is not donated, so a caller can refuse a non-finite result and keep
    `state` exactly as it was; the price is a second copy of the state during
    the step and no in-place update.
    """
    names = list(names)
    known, decayed = frozenset(names), _decayed(config, names, decayed)

    def step(state: AdamState, grads: dict[str, Grad]) -> tuple[AdamState, Array]:
        _check_grads(known, state, grads)
        new = _apply(config, decayed, state, grads)
        slots = [getattr(new, slot) for slot in SLOTS if getattr(new, slot)]
        return new, jnp.stack([_all_finite([slot[name] for slot in slots]) for name in names])

    return jax.jit(step) if config.jit_compile else step


def _all_finite(arrays: list[Array]) -> Array:
    """True when every element of `arrays` (of one shape) is finite; one reduction, not one per array."""
    finite = jnp.isfinite(arrays[0])
    for array in arrays[1:]:
        finite = finite & jnp.isfinite(array)
    return jnp.all(finite)


def _decayed(config: AdamConfig, names: Sequence[str], decayed: Collection[str] | None) -> frozenset[str]:
    """The tensors weight decay applies to: `decayed`, else those no exclusion pattern `re.search`es."""
    if config.weight_decay is None:
        return frozenset()
    if decayed is not None:
        return frozenset(decayed)
    return frozenset(name for name in names
                     if not any(re.search(pattern, name) for pattern in config.exclude_from_weight_decay))


def finalize(state: AdamState) -> AdamState:
    """tf-keras `finalize_variable_values`: with EMA, the parameters become (copies of) the averages."""
    if not state.ema:
        return state
    return state._replace(params={name: jnp.array(average, copy=True) for name, average in state.ema.items()})


_scheduled_rate = jax.jit(_learning_rate, static_argnums=0)


def learning_rate_at(config: AdamConfig, iterations: int) -> float:
    """The learning rate that the step starting at `iterations` completed steps uses (for reporting)."""
    if iterations < 0:
        raise InvalidArgument(f"iterations: must be >= 0, got {iterations}")
    return float(_scheduled_rate(config, jnp.int32(min(iterations, _INT32_MAX))))
