"""The six tf-keras learning-rate schedules as data plus pure float32 functions.

Each schedule is a frozen (hashable) dataclass named and shaped like the Keras
class, fields in `get_config()` order; `learning_rate(spec, step)` evaluates it
with the float32 operations tf-keras performs (spec/keras-adam.md §4.2,
tf_keras/optimizers/schedules/learning_rate_schedule.py). Parameters are
validated by `config.parse_config`, not here.
"""

import math
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from jax import Array, lax

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class ExponentialDecay:
    """`initial_learning_rate * decay_rate ** (step / decay_steps)`."""

    initial_learning_rate: float
    decay_steps: float
    decay_rate: float
    staircase: bool = False
    name: str | None = None


@dataclass(frozen=True)
class PiecewiseConstantDecay:
    """`values[i]` for `boundaries[i-1] < step <= boundaries[i]`."""

    boundaries: tuple[float, ...]
    values: tuple[float, ...]
    name: str | None = None


@dataclass(frozen=True)
class PolynomialDecay:
    """`(initial - end) * (1 - step / decay_steps) ** power + end`."""

    initial_learning_rate: float
    decay_steps: float
    end_learning_rate: float = 0.0001
    power: float = 1.0
    cycle: bool = False
    name: str | None = None


@dataclass(frozen=True)
class InverseTimeDecay:
    """`initial_learning_rate / (1 + decay_rate * step / decay_steps)`."""

    initial_learning_rate: float
    decay_steps: float
    decay_rate: float
    staircase: bool = False
    name: str | None = None


@dataclass(frozen=True)
class CosineDecay:
    """Optional linear warm-up to `warmup_target`, then a cosine decay to `alpha`."""

    initial_learning_rate: float
    decay_steps: float
    alpha: float = 0.0
    name: str | None = None
    warmup_target: float | None = None
    warmup_steps: float = 0


@dataclass(frozen=True)
class CosineDecayRestarts:
    """SGDR: cosine decay restarted after periods growing by `t_mul`."""

    initial_learning_rate: float
    first_decay_steps: float
    t_mul: float = 2.0
    m_mul: float = 1.0
    alpha: float = 0.0
    name: str | None = None


Schedule = (
    ExponentialDecay
    | PiecewiseConstantDecay
    | PolynomialDecay
    | InverseTimeDecay
    | CosineDecay
    | CosineDecayRestarts
)


def f32_constant(x: float | tuple[float, ...]) -> Array:
    """A Python number (or tuple) as float32, hidden from XLA's constant folding.

    TF evaluates each operation as written. XLA's algebraic simplifier would
    reassociate constants, e.g. `pi * (k / 10)` into `k * (pi / 10)`, and so
    round differently; behind an optimization barrier a constant stays an
    operand of the operation it is written in.
    """
    return lax.optimization_barrier(jnp.asarray(x, dtype=jnp.float32))


def _f32(x) -> Array:
    """A step (cast, as TF's `tf.cast(step, float32)`) or a constant (`f32_constant`)."""
    return x.astype(jnp.float32) if isinstance(x, Array) else f32_constant(x)


def _exponential(s: ExponentialDecay, step: Array) -> Array:
    p = _f32(step) / _f32(s.decay_steps)
    if s.staircase:
        p = jnp.floor(p)
    return _f32(s.initial_learning_rate) * jnp.power(_f32(s.decay_rate), p)


def _int32_boundary(b: float) -> int:
    """The boundary as TF compares it with its int64 step, clamped to the int32 range.

    TF converts a float boundary to a float32 tensor, then casts it to the
    step's integer dtype (truncating).
    """
    b = min(max(b, _INT32_MIN), _INT32_MAX)
    b = b if isinstance(b, int) else int(np.float32(b))
    return min(max(b, _INT32_MIN), _INT32_MAX)


def _piecewise(s: PiecewiseConstantDecay, step: Array) -> Array:
    bounds = jnp.asarray([_int32_boundary(b) for b in s.boundaries], dtype=step.dtype)
    return _f32(s.values)[jnp.sum(step > bounds)]


def _polynomial(s: PolynomialDecay, step: Array) -> Array:
    k, horizon = _f32(step), _f32(s.decay_steps)
    if s.cycle:
        periods = jnp.where(k == 0, _f32(1.0), jnp.ceil(k / horizon))
        horizon = horizon * periods
    else:
        k = jnp.minimum(k, horizon)
    initial, end = _f32(s.initial_learning_rate), _f32(s.end_learning_rate)
    return (initial - end) * jnp.power(1 - k / horizon, _f32(s.power)) + end


def _inverse_decay(s: InverseTimeDecay, step: Array) -> Array:
    p = _f32(step) / _f32(s.decay_steps)
    if s.staircase:
        p = jnp.floor(p)
    return _f32(s.initial_learning_rate) / (1 + _f32(s.decay_rate) * p)


def _cosine_decayed(alpha: float, k: Array, decay_steps: Array, start: Array) -> Array:
    """tf-keras `CosineDecay._decay_function`; `1 - alpha` is taken in double."""
    cosine = 0.5 * (1 + jnp.cos(_f32(math.pi) * (k / decay_steps)))
    return start * (_f32(1 - alpha) * cosine + _f32(alpha))


def _cosine(s: CosineDecay, step: Array) -> Array:
    initial, decay_steps, k = _f32(s.initial_learning_rate), _f32(s.decay_steps), _f32(step)
    if s.warmup_target is None:
        return _cosine_decayed(s.alpha, jnp.minimum(k, decay_steps), decay_steps, initial)
    target, warmup_steps = _f32(s.warmup_target), _f32(s.warmup_steps)
    k = jnp.minimum(k, decay_steps + warmup_steps)
    warming = (target - initial) * (k / warmup_steps) + initial
    decaying = _cosine_decayed(s.alpha, k - warmup_steps, decay_steps, target)
    return jnp.where(k < warmup_steps, warming, decaying)


def _cosine_restarts(s: CosineDecayRestarts, step: Array) -> Array:
    t_mul, m_mul, alpha = _f32(s.t_mul), _f32(s.m_mul), _f32(s.alpha)
    fraction = _f32(step) / _f32(s.first_decay_steps)
    if np.float32(s.t_mul) == 1:
        restart = jnp.floor(fraction)
        fraction = fraction - restart
    else:
        restart = jnp.floor(jnp.log(1 - fraction * (1 - t_mul)) / jnp.log(t_mul))
        fraction = (fraction - (1 - t_mul**restart) / (1 - t_mul)) / t_mul**restart
    cosine = 0.5 * m_mul**restart * (1 + jnp.cos(_f32(math.pi) * fraction))
    return _f32(s.initial_learning_rate) * ((1 - alpha) * cosine + alpha)


_EVALUATORS = {
    ExponentialDecay: _exponential,
    PiecewiseConstantDecay: _piecewise,
    PolynomialDecay: _polynomial,
    InverseTimeDecay: _inverse_decay,
    CosineDecay: _cosine,
    CosineDecayRestarts: _cosine_restarts,
}

SCHEDULE_CLASSES: dict[str, type] = {cls.__name__: cls for cls in _EVALUATORS}
"""The Keras class names accepted in a config, mapped to their dataclass."""


def learning_rate(spec: Schedule, step: Array | int) -> Array:
    """Evaluate `spec` at optimizer step `step` as tf-keras does.

    Args:
      spec: one of the six schedule dataclasses (static; hashable).
      step: the optimizer's `iterations` before the update (k = 0 on the first
        step), an int32 scalar (float32 also works). tf-keras hands the
        schedule its int64 counter: the decaying schedules cast it to float32,
        `PiecewiseConstantDecay` compares it with integer boundaries, which an
        int32 `step` reproduces exactly beyond 2**24.

    Returns:
      The learning rate as a float32 scalar.
    """
    step = jnp.asarray(step)
    return _f32(_EVALUATORS[type(spec)](spec, step))
