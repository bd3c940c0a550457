"""A cheap, conservative test that one Adam step cannot make the state non-finite.

Under non_finite_policy "refuse" a step that might overflow is computed beside the state
and checked (exact, but twice the memory and several times the time of the in-place step:
README, Errors). This module tells when that is unnecessary: from the largest gradient magnitude,
the config and upper bounds on the state's magnitudes, every intermediate of the step
stays below `LIMIT`, eight orders of magnitude under float32's largest value, so rounding
cannot bridge the gap. It may say "might overflow" for a safe step, never the reverse.
"""

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optserve.server import parallel
from optserve.server.engine import pipeline
from optserve.server.engine.config import AdamConfig, OptimizerConfig
from optserve.wire.layout import FlatLayout

LIMIT = 1e30  # float32 holds up to 3.4e38
_ROUNDING = 1 + 1e-5  # per formula: a few float32 roundings of 6e-8 each, with room to spare
_HALF_BITS = {"float16": (0x7C00, np.float16), "bfloat16": (0x7F80, None)}  # exponent all ones: Inf or NaN


class Magnitude(NamedTuple):
    """One gradient as the bound needs it."""

    largest: float  # max |g| after the cast to float32; inf or nan when some value is not finite
    elements: int  # values sent (the clipping norms sum over them)
    duplicates: int  # rows that may share an index and be summed (sparse), else 1
    squares: float | None = None  # sum of g*g in float32 blocks, when asked for (the metrics' gradient norm)


class Bounds(NamedTuple):
    """Upper bounds on max |x| over every tensor of each slot."""

    params: float
    m: float
    v: float
    vhat: float
    ema: float


BLOCK = 1 << 17  # values per block: 512 KiB of float32 stays in the L2 cache between a block's passes


def combined(magnitudes: Sequence[Sequence[Magnitude]]) -> list[Magnitude]:
    """One `Magnitude` bounding the sum of several pushes' gradients (a sync round's aggregate)."""
    flat = [m for push in magnitudes for m in push]
    if not flat:
        return []
    return [Magnitude(len(magnitudes) * max(m.largest for m in flat), sum(m.elements for m in flat),
                      sum(m.duplicates for m in flat))]


def magnitude(grad: np.ndarray | tuple[np.ndarray, np.ndarray], squares: bool = False) -> Magnitude:
    """The `Magnitude` of a dense gradient or of a sparse (indices, rows) one; no copy.

    Float32 values are read once from memory: each block's max, min (and
    `squares`: dot) run while it is in the cache, the blocks split across the cores.
    """
    values = grad[1] if isinstance(grad, tuple) else grad
    duplicates = len(grad[0]) if isinstance(grad, tuple) else 1
    if values.size == 0:
        return Magnitude(0.0, 0, duplicates, 0.0 if squares else None)
    half = _HALF_BITS.get(values.dtype.name)
    if half is None:
        flat = values.reshape(-1)

        def part(start: int, stop: int) -> _Tally:
            tally = _Tally(squares)
            for low in range(start, stop, BLOCK):
                tally.add(flat[low:min(low + BLOCK, stop)])
            return tally

        return _Tally.merged(parallel.each(flat.size, part), squares).magnitude(duplicates)
    exponent, dtype = half
    bits = int((values.view(np.uint16) & np.uint16(0x7FFF)).max())
    if bits >= exponent:
        largest = math.inf
    else:
        largest = float(np.uint16(bits).view(dtype)) if dtype else float(np.uint32(bits << 16).view(np.float32))
    total = None
    if squares:
        flat = values.reshape(-1)
        total = sum(_squares(flat[start:start + BLOCK].astype(np.float32)) for start in range(0, flat.size, BLOCK))
    return Magnitude(largest, int(values.size), duplicates, total)


def measure_flat(source: np.ndarray, layout: FlatLayout, squares: bool = False,
                 into: np.ndarray | None = None) -> dict[str, Magnitude]:
    """Measures each tensor of `layout` in flat float32 `source`, block by block, in one read of memory.

    With `into`, each block is copied there first and the copy (never the
    source) is measured while it is in the cache. The blocks are split
    across the cores (`parallel.each`).
    """
    spans = sorted((layout.offsets[name], layout.offsets[name] + layout.sizes[name], name) for name in layout.shapes)
    target = source if into is None else into

    def part(start: int, stop: int) -> dict[str, _Tally]:
        tallies: dict[str, _Tally] = {}
        first = 0  # the first span that may overlap the block
        for low in range(start, stop, BLOCK):
            high = min(low + BLOCK, stop)
            if into is not None:
                np.copyto(into[low:high], source[low:high])
            while first < len(spans) and spans[first][1] <= low:
                first += 1
            for begin, end, name in itertools.islice(spans, first, None):
                if begin >= high:
                    break
                if end > begin:
                    tallies.setdefault(name, _Tally(squares)).add(target[max(begin, low):min(end, high)])
        return tallies

    parts = parallel.each(layout.size, part)
    return {name: _Tally.merged([tallies[name] for tallies in parts if name in tallies], squares).magnitude(1)
            for name in layout.shapes}


class _Tally:
    """A float32 tensor's extremes and sum of squares, gathered block by block."""

    def __init__(self, squares: bool):
        self.highs: list[np.floating] = []
        self.lows: list[np.floating] = []
        self.elements = 0
        self.squares = 0.0 if squares else None

    @classmethod
    def merged(cls, tallies: list["_Tally"], squares: bool) -> "_Tally":
        """One tally of the blocks of several (the parts of one tensor)."""
        whole = cls(squares)
        for tally in tallies:
            whole.highs += tally.highs
            whole.lows += tally.lows
            whole.elements += tally.elements
            if squares:
                whole.squares += tally.squares
        return whole

    def add(self, block: np.ndarray) -> None:
        self.highs.append(block.max())
        self.lows.append(block.min())
        self.elements += block.size
        if self.squares is not None:
            self.squares += _squares(block)

    def magnitude(self, duplicates: int) -> Magnitude:
        if not self.elements:
            return Magnitude(0.0, 0, duplicates, self.squares)
        # np.max/np.min keep a NaN (Python's max would drop it by order); a NaN's block has NaN for both
        largest = max(abs(float(np.max(self.highs))), abs(float(np.min(self.lows))))
        return Magnitude(largest, self.elements, duplicates, self.squares)


def _squares(block: np.ndarray) -> float:
    return float(np.dot(block, block))


def all_finite(values: np.ndarray) -> bool:
    """No NaN or Inf, judged by the same one pass as `magnitude`."""
    return math.isfinite(magnitude(values).largest)


ADAM_TENSORS = ("params", "m", "v", "vhat", "ema")  # the fields of `Bounds`: an Adam state's tensors


@jax.jit
def _slot_maxima(state: pipeline.OptimizerState) -> jax.Array:
    def largest(tensors: pipeline.Tensors | None) -> jax.Array:  # padding is zero: it never raises a maximum
        return jnp.float32(0) if tensors is None else jnp.max(jnp.abs(tensors.flat), initial=0.0)

    return jnp.stack([largest(getattr(state, slot)) for slot in ADAM_TENSORS])


def bounds_of(state: pipeline.OptimizerState) -> Bounds:
    """The exact maxima of a state (a read pass over it); infinite where a value is not finite."""
    maxima = np.asarray(_slot_maxima(state), np.float64)
    return Bounds(*(float(x) if math.isfinite(x) else math.inf for x in maxima))


def next_bounds(config: OptimizerConfig, iterations: int, bounds: Bounds, grads: Sequence[Magnitude]
                ) -> Bounds | None:
    """Bounds of the state after one step at `iterations` completed steps; None if it might overflow.

    Only Adam's (and AdamW's) step is bounded here: for every other class the
    answer is None, so its steps are computed on a copy and checked.
    """
    if not isinstance(config, AdamConfig):
        return None
    lr = pipeline.learning_rate_at(config, iterations)
    t = min(iterations, 2**31 - 2) + 1.0
    bias_1 = 1 - float(np.float32(config.beta_1)) ** t
    epsilon = float(np.float32(config.epsilon))
    if config.adaptive_epsilon:  # epsilon * sqrt(1 - beta_2**t), taken a little low
        epsilon *= math.sqrt(max(1 - float(np.float32(config.beta_2)) ** t, 0.0)) / _ROUNDING
    if not (math.isfinite(lr) and lr < LIMIT and bias_1 >= 1e-6 and epsilon >= 1e-30):
        return None
    alpha = lr * _ROUNDING / (bias_1 - 1e-7)  # sqrt(1 - beta_2**t) <= 1
    largest = _clipped(config, grads)
    if largest is None:
        return None
    m = max(bounds.m, largest) * _ROUNDING  # m + (g - m) * rate, a convex combination
    v = max(bounds.v, largest * largest) * _ROUNDING
    vhat = max(bounds.vhat, v) if config.amsgrad else 0.0
    update = m * alpha / epsilon * _ROUNDING  # sqrt(v) + epsilon >= epsilon
    params = bounds.params
    if config.weight_decay is not None:
        decay = config.weight_decay * lr
        if bounds.params * config.weight_decay >= LIMIT or bounds.params * decay >= LIMIT:
            return None
        params = bounds.params * max(1.0, abs(1 - decay)) * _ROUNDING
    params = (params + update) * _ROUNDING
    ema = max(bounds.ema, params) * _ROUNDING if config.use_ema else 0.0
    if config.use_ema and config.ema_overwrite_frequency:
        params = max(params, ema)
    intermediates = (largest + bounds.m, largest * largest, m * alpha, update, params, v, vhat, ema)
    if not all(x < LIMIT for x in intermediates):
        return None
    return Bounds(params, m, v, vhat, ema)


def _clipped(config: AdamConfig, grads: Sequence[Magnitude]) -> float | None:
    """max |g| after clipping and summing duplicate rows; None when a norm or product might overflow."""
    if not grads or not all(math.isfinite(g.largest) for g in grads):
        return None
    if config.clipnorm is not None:  # x * c / max(norm, c): |result| <= |x|, but x * c and the norm must be finite
        if any(g.elements * g.largest**2 >= LIMIT or g.largest * config.clipnorm >= LIMIT for g in grads):
            return None
    if config.global_clipnorm is not None:  # the scale is at most 1 while the global norm is finite
        if sum(g.elements * g.largest**2 for g in grads) >= LIMIT:
            return None
    largest = max((g.largest if config.clipvalue is None else min(g.largest, config.clipvalue)) * g.duplicates
                  for g in grads) * _ROUNDING
    return largest if largest < LIMIT else None
