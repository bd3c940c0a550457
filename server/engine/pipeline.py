"""The shared tf-keras optimizer pipeline as pure functions over flat multi-tensor state.

tf-keras writes `apply_gradients` once for every class (learning rate, clip,
sum duplicate sparse rows, weight decay, the class's `update_step`, EMA,
overwrite, iterations) and each class only its `build` and `update_step`;
so does this module, with each class a `core.Core` in `optimizers/`.
`init` builds an `OptimizerState`, `make_step` returns the (jitted) function
that applies one set of gradients, `finalize` copies the moving averages into
the parameters. Each slot of the state is ONE flat float32 buffer laid out by
`optserve.wire.layout.FlatLayout` (every tensor at an aligned offset, padding
zero), and one step is one fused pass over those buffers, whatever the
number of tensors: per-tensor operations (clipnorm, weight-decay exclusions,
the sparse update order) are per-segment values broadcast over blocks of
`BLOCK` elements, which never straddle two tensors.

The numerics are those of tf-keras 2.11+ (spec/keras-adam.md for the
pipeline and Adam, spec/keras-optimizers.md for the family), all in float32.

Two places are the only ones that put state or gradients on a device, so a
placement (a sharding over local devices) is applied there: `_slot`, which
every state buffer of `init` and `restore` goes through, and `_upload`, which
every flat gradient goes through.
"""

import functools
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from optserve.server.engine import devices, schedules
from optserve.server.engine.config import OptimizerConfig
from optserve.server.engine.core import Context, SlotSpec
from optserve.server.engine.optimizers import core_of
from optserve.server.engine.schedules import f32_constant
from optserve.server.errors import InvalidArgument
from optserve.wire.layout import ALIGNMENT, FlatLayout

_INT32_MAX = int(np.iinfo(np.int32).max)
BLOCK = ALIGNMENT // 4  # float32 elements per aligned block; every tensor starts on a block boundary


class SparseGrad(NamedTuple):
    """A gradient for some rows of a tensor, like Keras's `tf.IndexedSlices`."""

    indices: Array  # int32 (n,): rows of the tensor, 0 <= i < rows; duplicates are summed
    values: Array  # float32/float16/bfloat16 (n, *shape[1:]): row j is the gradient of row indices[j]


Grad = Array | SparseGrad
"""A dense gradient (any float dtype, the tensor's shape) or a `SparseGrad`."""


@jax.tree_util.register_pytree_node_class
class Tensors(Mapping[str, Array]):
    """One slot of the state: every tensor's float32 values in one flat buffer laid out by `layout`.

    A pytree whose only leaf is `flat`; the layout is static. `tensors[name]`
    is that tensor, sliced out of the buffer (a new array of its shape).
    """

    __slots__ = ("flat", "layout")

    def __init__(self, flat: Array, layout: FlatLayout):
        self.flat = flat
        self.layout = layout

    def __getitem__(self, name: str) -> Array:
        offset, size = self.layout.offsets[name], self.layout.sizes[name]
        return self.flat[offset:offset + size].reshape(self.layout.shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.shapes)

    def __len__(self) -> int:
        return len(self.layout.shapes)

    def __contains__(self, name: object) -> bool:
        return name in self.layout.shapes

    def __eq__(self, other: object) -> bool:
        """Same layout and same leaf (equal values for arrays; tree-mapped leaves compare as they are)."""
        if not isinstance(other, Tensors):
            return NotImplemented
        a, b = self.flat, other.flat
        same = a is b or (bool(np.array_equal(a, b)) if hasattr(a, "shape") and hasattr(b, "shape") else a == b)
        return self.layout == other.layout and same

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, like the arrays it holds

    def tree_flatten(self) -> tuple[tuple[Array], FlatLayout]:
        return (self.flat,), self.layout

    @classmethod
    def tree_unflatten(cls, layout: FlatLayout, leaves: Sequence[Array]) -> "Tensors":
        return cls(leaves[0], layout)


class OptimizerState(NamedTuple):
    """Everything one optimizer holds; a pytree of device arrays, one flat float32 buffer per slot."""

    iterations: Array  # int32 (): completed steps k; saturates at 2**31 - 1 instead of wrapping
    params: Tensors  # the variables theta
    slots: dict[str, Tensors]  # the class's slots by tf-keras name, in build order (Adam: m, v, vhat)
    ema: Tensors | None  # moving averages of theta; None unless use_ema; starts as a copy of theta
    scalars: dict[str, Array] = {}  # optimizer-wide float32 () state by name (Nadam: u_product)

    # Adam's slots as attributes, for readers of an Adam state
    m = property(lambda self: self.slots.get("m"))
    v = property(lambda self: self.slots.get("v"))
    vhat = property(lambda self: self.slots.get("vhat"))


class FlatGrads(NamedTuple):
    """One step's gradients in the state's layout: one flat buffer for the dense ones, `SparseGrad`s for the rest.

    `dense` holds each dense gradient at its `FlatLayout` offset; its padding
    and the segments of sparse or absent tensors are ignored (may hold
    anything). It may be None when every gradient is sparse.
    """

    dense: Array | np.ndarray | None  # float32/float16/bfloat16 (layout.size,)
    sparse: Mapping[str, SparseGrad] = {}
    present: frozenset[str] | None = None  # the tensors that have a gradient; None: every tensor
    # float32 (tensors,), layout order: the largest |g| each dense gradient was measured at; the step reads any
    # other value (a NaN too) as 0, so bytes that changed after they were measured stay within the bound
    limits: Array | np.ndarray | None = None


RESERVED = ("params", "ema")  # names of `export`'s entries that are not slots


class NormInputs(NamedTuple):
    """Sums of squares of gradients that other shards hold, for clipping as if one optimizer held them all.

    Zeros (or no `NormInputs`) mean this state holds every gradient: tf-keras's own clipping.
    """

    total: Array | float = 0.0  # float32 (): added to the global sum of squares before global_clipnorm
    per_tensor: Array | None = None  # float32 (tensors,), layout order: added to each tensor's own before clipnorm


def layout_of(state: OptimizerState) -> FlatLayout:
    """The layout every slot of `state` shares."""
    return state.params.layout


def sparse_grad(indices: np.ndarray, values: np.ndarray) -> SparseGrad:
    """A `SparseGrad` on the default device, padded to a power-of-two number of rows.

    Padding rows have index 0 and value 0, which leaves every result
    unchanged (they add 0 to norms and sums), while the jitted step compiles
    once per bucket size instead of once per row count.

    Args:
      indices: integer (n,), each in [0, rows) of the target tensor (the
        caller checks the upper bound; the step ignores rows beyond it).
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


def _host_flat(layout: FlatLayout, tensors: Mapping[str, np.ndarray | Array]) -> np.ndarray:
    """A zeroed float32 host buffer in `layout` holding `tensors` (float32 casts of them)."""
    flat = np.zeros(layout.size, np.float32)
    views = layout.views(flat)
    for name, value in tensors.items():
        np.copyto(views[name], np.asarray(value), casting="unsafe")
    return flat


def _slot(layout: FlatLayout, tensors: Mapping[str, np.ndarray | Array] | None) -> Tensors | None:
    """A slot on the layout's devices holding `tensors` (None for no tensors, an unused slot).

    Every state buffer goes on the device here: the one place for a placement.
    """
    if not tensors:
        return None
    flat = None  # tensors that already lie in the layout, with no padding to zero, are copied once, as they lie
    if not layout.padded and len(tensors) == len(layout.shapes) \
            and all(isinstance(value, np.ndarray) for value in tensors.values()):
        flat = _flat_view(layout, tensors)
    return Tensors(devices.own(_host_flat(layout, tensors) if flat is None else flat, layout), layout)


def _filled(spec: SlotSpec) -> Tensors:
    """A slot as a class builds it: `spec.value` inside every tensor, padding 0."""
    layout = spec.layout
    if not layout.shapes:
        return Tensors(jnp.zeros(0, jnp.float32), layout)
    if not spec.value or not layout.padded:  # no padding to keep at 0
        return Tensors(devices.filled(layout, spec.value), layout)
    flat = np.zeros(layout.size, np.float32)
    for view in layout.views(flat).values():
        view.fill(spec.value)
    return Tensors(devices.own(flat, layout), layout)


def init(params: Mapping[str, np.ndarray | Array], config: OptimizerConfig,
         layout: FlatLayout | None = None) -> OptimizerState:
    """A fresh state for `params` (laid out in their order), copied as float32 onto jax's default device.

    `layout` (of `params`' shapes, in their order) places the tensors
    otherwise, e.g. a `devices.ShardedLayout` spreads every slot over a mesh.

    The class's slots start at their Keras initial values. As in tf-keras
    (`add_variable_from_reference(var, "average", initial_value=var)`), the
    moving averages start as a copy of the initial parameters; Keras 3 starts
    them at the first updated value instead (spec/keras-adam.md §2.3).
    """
    core = core_of(config)
    layout = layout or FlatLayout({name: np.shape(value) for name, value in params.items()})
    theta = _slot(layout, params) or Tensors(jnp.zeros(0, jnp.float32), layout)
    return OptimizerState(
        iterations=jnp.zeros((), jnp.int32),
        params=theta,
        slots={name: _filled(spec) for name, spec in core.slots(config, layout).items()},
        ema=Tensors(jnp.array(theta.flat, copy=True), layout) if config.use_ema else None,
        scalars={name: jnp.float32(value) for name, value in core.scalars.items()},
    )


def assign(tensors: Tensors, values: Mapping[str, np.ndarray]) -> Tensors:
    """`tensors` with some of them set to `values` (by name, any shape of their size), in place: the buffer
    is donated, and only the values' elements are written."""
    layout = tensors.layout
    indices = np.concatenate([np.arange(layout.offsets[name], layout.offsets[name] + layout.sizes[name])
                              for name in values]).astype(np.int32)
    flat = _written(tensors.flat, indices, np.concatenate([np.ravel(value) for value in values.values()]))
    return Tensors(devices.put(flat, layout), layout)  # the layout's sharding, where the scatter chose another


@functools.partial(jax.jit, donate_argnums=0)
def _written(flat: Array, indices: Array, values: Array) -> Array:
    return flat.at[indices].set(values.astype(flat.dtype), unique_indices=True)


def export(state: OptimizerState) -> dict[str, dict[str, np.ndarray]]:
    """Host copies of every tensor of a state, by slot then tensor name (for checkpoints); {} for no EMA.

    "params" and "ema" are the weights and their average; the other entries
    are the class's slots by tf-keras name. `export_scalars` has the rest.
    """
    def host(tensors: Tensors | None) -> dict[str, np.ndarray]:
        if tensors is None:
            return {}
        return {name: np.array(view) for name, view in tensors.layout.views(np.asarray(tensors.flat)).items()}

    return {"params": host(state.params), "ema": host(state.ema),
            **{name: host(tensors) for name, tensors in state.slots.items()}}


def export_scalars(state: OptimizerState) -> dict[str, float]:
    """The optimizer-wide scalars as Python floats (exact: every float32 is a double)."""
    return {name: float(value) for name, value in state.scalars.items()}


def restore(iterations: int, slots: Mapping[str, Mapping[str, np.ndarray]],
            scalars: Mapping[str, float] | None = None, config: OptimizerConfig | None = None,
            layout: FlatLayout | None = None) -> OptimizerState:
    """The state that `export` (and `export_scalars`) captured, back on jax's default device (or `layout`'s).

    The parameters are laid out in the order of `slots["params"]`; a slot
    holding a tensor of every parameter's shape shares that layout, any
    other slot (Adafactor's factors) is laid out in its own order. With
    `config`, the slots are the ones its class builds, in build order: one
    over no tensor at all (Adafactor's factors of rank-1 tensors only) needs
    no entry; any other missing is an InvalidArgument.
    """
    layout = layout or FlatLayout({name: np.shape(value) for name, value in slots["params"].items()})

    def slot_of(tensors: Mapping[str, np.ndarray]) -> Tensors | None:
        own = FlatLayout({name: np.shape(value) for name, value in tensors.items()})
        return _slot(layout if own.shapes == layout.shapes else own, tensors) or Tensors(jnp.zeros(0, jnp.float32), own)

    restored = {name: slot_of(tensors) for name, tensors in slots.items() if name not in RESERVED}
    if config is not None:
        specs = core_of(config).slots(config, layout)
        for name, spec in specs.items():
            if name not in restored and spec.layout.shapes:
                raise InvalidArgument(f"slots.{name}: missing; class {config.class_name} keeps it")
        restored = {name: restored.get(name) or _filled(spec) for name, spec in specs.items()}
    return OptimizerState(
        iterations=jnp.asarray(iterations, jnp.int32),
        params=_slot(layout, slots["params"]) or Tensors(jnp.zeros(0, jnp.float32), layout),
        slots=restored,
        ema=_slot(layout, slots.get("ema")),  # no entry: no EMA
        scalars={name: jnp.float32(value) for name, value in (scalars or {}).items()},
    )


def flat_grads(layout: FlatLayout, grads: Mapping[str, Grad | np.ndarray]) -> FlatGrads:
    """`grads` by name as `FlatGrads` on jax's default device, the dense ones in one flat buffer.

    The dense gradients are taken as they lie when all are float32 views,
    each at its `layout` offset, of one aligned buffer (a receive buffer in
    the optimizer's layout); else they are copied into a fresh buffer
    (`np.copyto`, which releases the GIL), float32 unless all share one half
    dtype. On the CPU jax adopts an aligned buffer without copying it.
    Refuses (InvalidArgument) a dense gradient of the wrong shape or dtype.
    """
    dense = {name: np.asarray(g) for name, g in grads.items() if not isinstance(g, SparseGrad)}
    sparse = {name: g for name, g in grads.items() if isinstance(g, SparseGrad)}
    present = None if len(grads) == len(layout.shapes) and all(name in layout.shapes for name in grads) \
        else frozenset(grads)
    if not dense:
        return FlatGrads(None, sparse, present)
    flat = _flat_view(layout, dense)
    if flat is None:
        dtypes = {g.dtype for g in dense.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 and dtypes <= {np.dtype(np.float16), np.dtype(jnp.bfloat16)} \
            else np.float32
        flat = np.zeros(layout.size, dtype)
        views = layout.views(flat, [name for name in dense if name in layout.shapes])
        for name, view in views.items():
            if dense[name].shape != view.shape:
                raise InvalidArgument(f"gradients[{name!r}].shape: must be {view.shape}, got {dense[name].shape}")
            if not jnp.issubdtype(dense[name].dtype, jnp.floating):
                raise InvalidArgument(f"gradients[{name!r}].dtype: must be a float type, got {dense[name].dtype}")
            np.copyto(view, dense[name], casting="unsafe")
    return FlatGrads(devices.put(flat, layout), sparse, present)


def _flat_view(layout: FlatLayout, dense: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The one aligned float32 buffer of which every array of `dense` is the view at its layout offset, or None."""
    first = next(iter(dense))
    base = dense[first].ctypes.data - 4 * layout.offsets.get(first, 0)
    if base % ALIGNMENT:
        return None
    for name, grad in dense.items():
        if (name not in layout.shapes or grad.dtype != np.float32 or grad.shape != layout.shapes[name]
                or not grad.flags.c_contiguous or grad.ctypes.data != base + 4 * layout.offsets[name]):
            return None
    owner = dense[first]  # find the array whose memory holds the whole layout
    while isinstance(owner, np.ndarray):
        start = owner.ctypes.data
        if owner.flags.c_contiguous and start <= base and base + layout.nbytes <= start + owner.nbytes:
            return np.frombuffer(owner, np.uint8, layout.nbytes, base - start).view(np.float32)
        owner = owner.base
    return None


# --- stages of one step, in the order `_apply` runs them ----------------------


def _learning_rate(config: OptimizerConfig, k: Array) -> Array:
    """The lr of step k: the schedule at k, or the constant as Keras stores it (float32)."""
    lr = config.learning_rate
    if isinstance(lr, int | float):
        return f32_constant(lr)
    return schedules.learning_rate(lr, k)


class _Blocks(NamedTuple):
    """Per-block tables of a layout (host-made once per layout, passed as arguments, not baked-in constants).

    For per-tensor sums, blocks are also taken BLOCK at a time in groups: a
    group inside one tensor is summed as a whole, the blocks of a group that
    straddles tensors (or the buffer's end) one by one.
    """

    segment: Array  # int32 (blocks,): the tensor (index in layout order) each block belongs to
    valid: Array  # int32 (blocks,): elements of the block inside its tensor (BLOCK, but in a last block)
    group_segment: Array  # int32 (blocks // BLOCK,): the tensor holding the whole group, else the tensor count
    edges: Array  # int32 (n,): the blocks of the groups that straddle
    edge_segment: Array  # int32 (n,): their tensors


def _block_tables(layout: FlatLayout) -> _Blocks:
    """The tables of `layout`; a block of padding between tensors (or after them) counts as the tensor before
    it with no valid element, as the padding of a tensor's last block does."""
    sizes = np.array([layout.sizes[name] for name in layout.shapes], np.int64)
    offsets = np.array([layout.offsets[name] for name in layout.shapes], np.int64)
    starts = np.arange(layout.size // BLOCK, dtype=np.int64) * BLOCK
    segment = np.maximum(np.searchsorted(offsets, starts, side="right") - 1, 0).astype(np.int32)
    valid = np.clip(offsets[segment] + sizes[segment] - starts, 0, BLOCK).astype(np.int32) if sizes.size \
        else np.zeros(0, np.int32)
    groups = segment[:segment.size // BLOCK * BLOCK].reshape(-1, BLOCK)  # the blocks after the last whole group
    whole = (groups == groups[:, :1]).all(axis=1)                        # are edges
    edges = np.flatnonzero(np.concatenate([np.repeat(~whole, BLOCK), np.ones(segment.size % BLOCK, bool)]))
    edges = edges.astype(np.int32)
    return _Blocks(*map(jnp.asarray, (segment, valid, np.where(whole, groups[:, 0], len(sizes)).astype(np.int32),
                                      edges, segment[edges])))


class Segments:
    """Per-tensor values over the (blocks, BLOCK) view of a flat buffer, while tracing.

    Per-tensor values become (blocks, 1) columns and every operation mixing
    them with full-size values runs in the (blocks, BLOCK) shape, then is
    flattened: so XLA computes it inside each fusion that consumes it rather
    than materialising a full-size temporary (on the CPU each one costs a
    fresh mapping of the buffer's pages), and the state stays 1-D, which XLA
    needs to update it in place.
    """

    def __init__(self, layout: FlatLayout, blocks: _Blocks):
        self.layout, self.blocks = layout, blocks
        self.names = list(layout.shapes)
        self.shape = (layout.size // BLOCK, BLOCK)

    def column(self, per_tensor: Array) -> Array:
        """(tensors,) values -> (blocks, 1), each block the value of its tensor."""
        if len(self.names) == 1:
            return jnp.broadcast_to(per_tensor, (self.shape[0], 1))
        return per_tensor[self.blocks.segment][:, None]

    def rows(self, flat: Array) -> Array:
        """(size,) -> (blocks, BLOCK), a view."""
        return flat.reshape(self.shape)

    def mask(self, names: Collection[str]) -> Array | bool:
        """Where the tensors `names` lie: a bool (blocks, 1), or a Python bool when all or none do."""
        flags = [name in names for name in self.names]
        if all(flags) or not any(flags):
            return bool(flags) and flags[0]
        return self.column(jnp.asarray(np.array(flags)))

    def inside(self) -> Array | bool:
        """(blocks, BLOCK) bool: elements that belong to a tensor, not padding (True: no padding)."""
        if not self.layout.padded:
            return True
        lane = jax.lax.broadcasted_iota(jnp.int32, self.shape, 1)
        return lane < self.blocks.valid[:, None]

    def where(self, mask: Array | bool, yes: Array, no: Array | float) -> Array:
        """jnp.where over flat buffers with a (blocks, 1) or (blocks, BLOCK) mask; free for a Python bool mask.

        Runs in 1-D (the mask flattened), so that an output slot read
        elementwise stays updated in place.
        """
        if mask is True:
            return yes
        if mask is False:
            return jnp.broadcast_to(jnp.asarray(no, yes.dtype), yes.shape) if np.ndim(no) == 0 else no
        return jnp.where(jnp.broadcast_to(mask, self.shape).reshape(-1), yes, no)

    def where_rows(self, mask: Array | bool, yes: Array, no: float) -> Array:
        """Like `where` but in the (blocks, BLOCK) shape: for a value many fusions read (XLA repeats it in each)."""
        if mask is True:
            return yes
        return jnp.where(mask, self.rows(yes), no).reshape(-1)

    def lane_sums(self, lane_value: Callable[[int], Array]) -> Array:
        """(blocks,): the sum over each block's lanes of `lane_value(lane)`, a (blocks,) value of that lane.

        Each lane's value is computed from its strided column and the lanes
        are added in a tree, which XLA emits as one loop over the buffers; a
        reduce op over the rows (or one masked producer shared by the lanes)
        would first be materialised in full.
        """
        parts = [lane_value(lane) for lane in range(BLOCK)]
        while len(parts) > 1:
            parts = [parts[i] + parts[i + 1] for i in range(0, len(parts), 2)]
        return parts[0]

    def square_sums(self, flat: Array, mask: Array | bool = True) -> Array:
        """(tensors,): the sum of squares of each tensor's elements of `flat` where `mask` (blocks, 1), 0 in the padding."""
        if len(self.names) == 1 and mask is True and not self.layout.padded:  # one reduce straight over the buffer
            return jnp.sum(jnp.square(flat.astype(jnp.float32)), keepdims=True)
        rows = self.rows(flat)

        def square(lane: int) -> Array:
            keep = lane < self.blocks.valid if mask is True else (lane < self.blocks.valid) & mask[:, 0]
            x = jnp.where(keep, rows[:, lane].astype(jnp.float32), 0)
            return x * x

        return self.block_totals(self.lane_sums(square))

    def square_total(self, flat: Array, mask: Array | bool = True) -> Array:
        """(): the sum of squares of `flat` where `mask`, 0 in the padding."""
        if mask is True and not self.layout.padded:  # one reduce straight over the buffer
            return jnp.sum(jnp.square(flat.astype(jnp.float32)))
        return jnp.sum(self.square_sums(flat, mask))

    def block_totals(self, blocks: Array) -> Array:
        """(blocks,) -> (tensors,): the sum of each tensor's blocks (by whole groups, and straddling blocks)."""
        count = len(self.names)
        groups = blocks[:blocks.shape[0] // BLOCK * BLOCK].reshape(-1, BLOCK)
        group_sums = self.lane_sums(lambda lane: groups[:, lane])
        return (jax.ops.segment_sum(group_sums, self.blocks.group_segment, num_segments=count)
                + jax.ops.segment_sum(blocks[self.blocks.edges], self.blocks.edge_segment, num_segments=count,
                                      indices_are_sorted=True))


def _clip_norm(x: Array, c: Array, norm: Array) -> Array:
    """tf.clip_by_norm: x * c / max(norm, c)."""
    return x * c / jnp.maximum(norm, c)


def _clip(config: OptimizerConfig, segments: Segments, g: Array, squares: Callable[[], Array],
          sparse: dict[str, SparseGrad], others: NormInputs | None = None) -> tuple[Array, dict[str, SparseGrad]]:
    """tf-keras `_clip_gradients`: clipnorm (per tensor), else global_clipnorm, else clipvalue.

    `g` is the dense part, zero outside the dense tensors; `squares()` its
    sum of squares per tensor, (tensors,), and `squares(total=True)` their sum. Sparse gradients are clipped on
    their raw value rows, before duplicates are summed, as TF does on
    `IndexedSlices`. `others` adds the sums of squares of other shards' gradients to the norms.
    """
    if config.clipnorm is not None:
        c = f32_constant(config.clipnorm)
        extra = None if others is None else others.per_tensor
        own = squares() if extra is None else squares() + extra
        g = (segments.rows(g) * c / segments.column(jnp.maximum(jnp.sqrt(own), c))).reshape(-1)
        index = {name: i for i, name in enumerate(segments.names)}

        def sparse_norm(name: str, s: SparseGrad) -> Array:
            total = jnp.sum(s.values * s.values)
            return jnp.sqrt(total if extra is None else total + extra[index[name]])

        return g, {name: s._replace(values=_clip_norm(s.values, c, sparse_norm(name, s))) for name, s in sparse.items()}
    if config.global_clipnorm is not None:  # tf.clip_by_global_norm; NaN for a non-finite norm
        c = f32_constant(config.global_clipnorm)
        total = sum((jnp.sum(jnp.square(s.values)) for s in sparse.values()), squares(total=True))
        norm = jnp.sqrt(total if others is None else total + others.total)
        scale = c * jnp.minimum(1 / norm, 1 / c) + (norm - norm)
        return g * scale, {name: s._replace(values=s.values * scale) for name, s in sparse.items()}
    if config.clipvalue is not None:
        c = f32_constant(config.clipvalue)
        return jnp.clip(g, -c, c), {name: s._replace(values=jnp.clip(s.values, -c, c)) for name, s in sparse.items()}
    return g, sparse


def _within(segments: Segments, dense: Array, limits: Array) -> Array:
    """`dense` with every value past its tensor's limit (and every NaN) read as 0; the others as they are."""
    rows = segments.rows(dense)
    return jnp.where(jnp.abs(rows.astype(jnp.float32)) <= segments.column(limits), rows, 0).reshape(-1)


def _dense_squares(segments: Segments, dense: Array | None, is_dense: Array | bool, total: bool = False) -> Array:
    """(tensors,): each dense gradient's sum of squares (0 for the others), read from the raw buffer; or their sum."""
    if dense is None or is_dense is False:
        return jnp.zeros(() if total else len(segments.names), jnp.float32)
    return segments.square_total(dense, is_dense) if total else segments.square_sums(dense, is_dense)


def _scatter_sparse(layout: FlatLayout, g: Array, sparse: dict[str, SparseGrad]) -> tuple[Array, Array | bool]:
    """Adds every sparse gradient's rows into its tensor's segment of the flat `g`; equal indices are summed.

    One scatter for all of them, rows in order (`_deduplicate_sparse_grad`'s
    sums); rows beyond a tensor's end are dropped, never spilled into the next.
    Also returns where the rows landed, a bool (size,) (True everywhere without sparse
    gradients): classes whose sparse branch gathers rows (RMSprop, Adagrad) update those only.
    """
    if not sparse:
        return g, True
    indices, values = [], []
    for name, s in sparse.items():
        shape = layout.shapes[name]
        row = int(np.prod(shape[1:], dtype=np.int64))
        start = jnp.where(s.indices < shape[0], layout.offsets[name] + s.indices * row, layout.size)
        indices.append((start[:, None] + jnp.arange(row, dtype=jnp.int32)).reshape(-1))
        values.append(s.values.reshape(-1))
    flat_indices = jnp.concatenate(indices)
    rows = jnp.zeros(layout.size, bool).at[flat_indices].set(True, mode="drop")
    return g.at[flat_indices].add(jnp.concatenate(values), mode="drop"), rows


def _moving_average(average: Array, param: Array, momentum: float) -> Array:
    """EMA of the post-update parameter: mu * average + (1 - mu) * theta."""
    return f32_constant(momentum) * average + f32_constant(1 - momentum) * param


def _saturating_increment(k: Array) -> Array:
    return jnp.where(k == _INT32_MAX, k, k + 1)


def _check_grads(known: frozenset[str], layout: FlatLayout, grads: FlatGrads) -> None:
    """Refuse, before the state is donated, gradients that would silently broadcast or be ignored."""
    present = frozenset(layout.shapes) if grads.present is None else grads.present
    if not present:
        raise InvalidArgument("gradients: empty; a step needs at least one gradient")
    unknown = sorted(name for name in present if name not in known or name not in layout.shapes)
    if unknown:
        raise InvalidArgument(f"gradients[{unknown[0]!r}]: no such tensor")
    for name, grad in grads.sparse.items():
        if name not in present:
            raise InvalidArgument(f"gradients[{name!r}]: a sparse gradient for a tensor not in `present`")
        shape, values = layout.shapes[name], grad.values
        if not jnp.issubdtype(values.dtype, jnp.floating):
            raise InvalidArgument(f"gradients[{name!r}].dtype: must be a float type, got {values.dtype}")
        wanted = (grad.indices.shape[0], *shape[1:])
        if not shape or grad.indices.ndim != 1 or values.shape != wanted:
            raise InvalidArgument(f"gradients[{name!r}].values.shape: must be {wanted}, got {values.shape}")
    if len(grads.sparse) < len(present):
        dense = grads.dense
        if dense is None:
            raise InvalidArgument("gradients: the dense buffer is missing but some gradients are dense")
        if not jnp.issubdtype(dense.dtype, jnp.floating):
            raise InvalidArgument(f"gradients.dtype: must be a float type, got {dense.dtype}")
        if tuple(dense.shape) != (layout.size,):
            raise InvalidArgument(f"gradients.shape: the flat buffer must be ({layout.size},), got {dense.shape}")
    if grads.limits is not None and tuple(np.shape(grads.limits)) != (len(layout.shapes),):
        raise InvalidArgument(f"gradients.limits: one per tensor, ({len(layout.shapes)},), "
                              f"got {np.shape(grads.limits)}")


def _apply(config: OptimizerConfig, decayed: frozenset[str], state: OptimizerState, dense: Array | None,
           sparse: dict[str, SparseGrad], blocks: _Blocks, present: frozenset[str] | None,
           others: NormInputs | None = None, limits: Array | None = None) -> OptimizerState:
    """One tf-keras `apply_gradients` call (spec/keras-adam.md §2.1, with §1 and §3), over flat buffers.

    With k = state.iterations:
      1. lr = schedule(k), or the float32 constant;
      2. clip: clipnorm per tensor, else global_clipnorm, else clipvalue
         (sparse: on the raw value rows); `others` adds other shards' sums of squares;
      3. sum duplicate sparse rows into their segment of the dense gradient;
      4. weight decay for the tensors in `decayed`: theta -= theta * wd * lr;
      5. the class's `update_step` (its `Core.update`), with t = k + 1;
      6. EMA of the updated theta;
      7. every `ema_overwrite_frequency`-th step (k + 1 divisible): theta = EMA;
      8. iterations = k + 1, saturating.
    Tensors not in `present` (None: all) keep their parameters, slots and
    average, as tf-keras skips variables whose gradient is None; padding
    elements keep their zeros. With `limits` (`FlatGrads.limits`) every read
    of the dense buffer sees only values within them.
    """
    core = core_of(config)
    layout = layout_of(state)
    segments = Segments(layout, blocks)
    names = frozenset(layout.shapes) if present is None else present
    k = state.iterations
    lr = _learning_rate(config, k)
    inside = segments.inside()
    updated = inside & segments.mask(names) if present is not None else inside  # elements this step writes
    is_dense = segments.mask(names - frozenset(sparse))
    if dense is not None and limits is not None:
        dense = _within(segments, dense, limits)
    if dense is None or is_dense is False:
        g = jnp.zeros(layout.size, jnp.float32)
    else:
        g = segments.where_rows(inside & is_dense, dense.astype(jnp.float32), 0)
    sparse = {name: s._replace(values=s.values.astype(jnp.float32)) for name, s in sparse.items()}
    g, sparse = _clip(config, segments, g, functools.partial(_dense_squares, segments, dense, is_dense), sparse,
                      others)
    touched: Array | bool = True
    if sparse:
        g, rows = _scatter_sparse(layout, segments.where(is_dense, g, 0), sparse)
        touched = segments.where(is_dense, jnp.ones(layout.size, bool), rows)
    ctx = Context(segments, layout, lr, k, g, segments.mask(frozenset(sparse)), touched, names)

    param = state.params.flat
    if config.weight_decay is not None:
        param = segments.where(segments.mask(decayed), param - param * f32_constant(config.weight_decay) * lr, param)
    slots = {name: tensors.flat for name, tensors in state.slots.items()}
    param, new_slots, scalars = core.update(ctx, config, param, slots, state.scalars)
    # padding: g is 0 there, but theta could turn 0 * inf (decay, lr) or 0 / 0 (epsilon 0) into NaN, and pass
    # it on to the average: it is kept 0 by a select against 0 (one against the old values would cost XLA a
    # copy of each slot, as it no longer updates them in place); so are the slots whose update might not
    param = segments.where(inside, param, 0)
    shared = {name for name, tensors in state.slots.items() if tensors.layout == layout}  # in the params' layout
    new_slots = {name: segments.where(inside, value, 0)
                 if name in shared and name not in core.padding_stays_zero else value
                 for name, value in new_slots.items()}
    ema = None if state.ema is None else state.ema.flat
    if config.use_ema:
        ema = _moving_average(ema, param, config.ema_momentum)
    iterations = _saturating_increment(k)
    if config.use_ema and config.ema_overwrite_frequency:
        param = jnp.where(iterations % config.ema_overwrite_frequency == 0, ema, param)
    if present is not None:  # tensors missing from `grads` keep their values (at the price of those copies)
        param = segments.where(updated, param, state.params.flat)
        ema = None if ema is None else segments.where(updated, ema, state.ema.flat)
        new_slots = {name: segments.where(updated, value, slots[name]) if name in shared else value
                     for name, value in new_slots.items()}
    def placed(value: Array, slot_layout: FlatLayout) -> Tensors:  # keeps a sharded slot's sharding
        return Tensors(devices.constrain(value, slot_layout), slot_layout)

    return OptimizerState(iterations, placed(param, layout),
                          {name: placed(value, state.slots[name].layout) for name, value in new_slots.items()},
                          None if ema is None else placed(ema, layout), dict(scalars))


def _finite_per_tensor(segments: Segments, state: OptimizerState) -> Array:
    """(tensors,) bool in layout order: every value of the tensor in every slot is finite.

    A slot in a layout of its own (Adafactor's factors) is judged as a whole:
    a non-finite value there marks every tensor.
    """
    layout = layout_of(state)
    buffers = [state.params, *([] if state.ema is None else [state.ema]), *state.slots.values()]
    rows = [segments.rows(tensors.flat) for tensors in buffers if tensors.layout == layout]
    own = [jnp.all(jnp.isfinite(tensors.flat)) for tensors in buffers if tensors.layout != layout]
    own += [jnp.isfinite(value) for value in state.scalars.values()]

    def bad(lane: int) -> Array:
        ok = functools.reduce(jnp.logical_and, [jnp.isfinite(slot[:, lane]) for slot in rows])
        return (~ok).astype(jnp.int32)

    finite = segments.block_totals(segments.lane_sums(bad)) == 0
    return functools.reduce(jnp.logical_and, own, finite)


class _Step:
    """The public step: checks and packs the gradients, then runs the one jitted function for the layout."""

    def __init__(self, config: OptimizerConfig, names: Sequence[str], decayed: Collection[str] | None, checked: bool):
        self._known = frozenset(names)
        decayed = _decayed(config, names, decayed)
        self._checked = checked

        def run(state: OptimizerState, dense: Array | None, sparse: dict[str, SparseGrad], blocks: _Blocks,
                others: NormInputs | None, limits: Array | None, present: frozenset[str] | None,
                ) -> OptimizerState | tuple[OptimizerState, Array]:
            new = _apply(config, decayed, state, dense, sparse, blocks, present, others, limits)
            if not checked:
                return new
            return new, _finite_per_tensor(Segments(layout_of(state), blocks), new)

        if config.jit_compile:
            run = jax.jit(run, static_argnames="present", donate_argnums=() if checked else 0)
        self._run = run
        self._tables: tuple[FlatLayout, _Blocks] | None = None

    def __call__(self, state: OptimizerState, grads: Mapping[str, Grad] | FlatGrads,
                 norm_inputs: NormInputs | None = None):
        layout = layout_of(state)
        if not isinstance(grads, FlatGrads):
            for name in grads:
                if name not in self._known or name not in layout.shapes:
                    raise InvalidArgument(f"gradients[{name!r}]: no such tensor")
            grads = flat_grads(layout, grads)
        _check_grads(self._known, layout, grads)
        if self._tables is None or self._tables[0] != layout:
            self._tables = layout, _block_tables(layout)
        if norm_inputs is not None:
            norm_inputs = _checked_norm_inputs(norm_inputs, len(layout.shapes))
        return self._run(state, grads.dense, dict(grads.sparse), self._tables[1], norm_inputs, grads.limits,
                         present=grads.present)

    def _cache_size(self) -> int:
        """Compiled variants so far (jitted only): one per layout, set of sparse tensors, dtype and bucket."""
        return self._run._cache_size()


def make_step(config: OptimizerConfig, names: Sequence[str], decayed: Collection[str] | None = None,
              ) -> Callable[[OptimizerState, Mapping[str, Grad] | FlatGrads], OptimizerState]:
    """The function applying one set of gradients: `step(state, grads) -> new state`.

    `config` is a constant of the trace; the lr, the bias corrections and the
    EMA overwrite test are computed from `state.iterations` inside, so new
    steps never recompile (only a new layout, set of sparse or present
    tensors, dtype or sparse bucket does). The trace is one pass over the
    flat buffers: its size does not grow with the number of dense tensors.
    Unless `config.jit_compile` is False the function is jitted with the
    state donated: the caller's `state` is invalid after the call, and XLA
    updates its buffers in place.

    Un-jitted, the step runs tf-keras's float32 operations one by one; on CPU
    it reproduces the conformance trajectories to within a few ulps (the
    norms sum in another order). Jitted, XLA fuses multiply-adds, which moves
    results by a few ulps more (under 3% of the conformance tolerance).

    Args:
      config: the optimizer's settings.
      names: the tensor names of the state.
      decayed: the names that weight decay applies to. None matches
        `exclude_from_weight_decay` here with `re.search`, in-process and
        unbounded: for trusted configs only (the server passes the set that
        `optserve.server.patterns` computed with a time bound).

    Returns:
      `step(state, grads, norm_inputs=None)`, where `grads` is `FlatGrads` in
      the state's layout, or maps some or all of `names` to a dense gradient
      (any float dtype, cast to float32; copied into one flat buffer unless
      already laid out) or a `SparseGrad`; `norm_inputs` (a `NormInputs`)
      adds the sums of squares of gradients that other shards hold to the
      global norm and to each tensor's own before clipping. It raises
      `InvalidArgument` for an unknown name, a wrong shape or a non-float
      dtype, before touching the state.
    """
    return _Step(config, names, decayed, checked=False)


def make_checked_step(config: OptimizerConfig, names: Sequence[str], decayed: Collection[str] | None = None,
                      ) -> Callable[[OptimizerState, Mapping[str, Grad] | FlatGrads], tuple[OptimizerState, Array]]:
    """Like `make_step`, but keeps the input state and reports which tensors the step left finite.

    `step(state, grads) -> (new_state, finite)`: `finite[i]` is true when every
    new value of the i-th tensor of the state's layout (params, m, v, vhat,
    ema) is finite. The state is not donated, so a caller can refuse a
    non-finite result and keep `state` exactly as it was; the price is a
    second copy of the state during the step and no in-place update.
    """
    return _Step(config, names, decayed, checked=True)


def _checked_norm_inputs(norm_inputs: NormInputs, tensors: int) -> NormInputs:
    """`norm_inputs` as float32 device values; InvalidArgument for a per-tensor vector of the wrong length."""
    per_tensor = norm_inputs.per_tensor
    if per_tensor is not None:
        per_tensor = jnp.asarray(per_tensor, jnp.float32)
        if per_tensor.shape != (tensors,):
            raise InvalidArgument(f"norm_inputs.per_tensor: must have shape ({tensors},), got {per_tensor.shape}")
    return NormInputs(jnp.asarray(norm_inputs.total, jnp.float32), per_tensor)


def _decayed(config: OptimizerConfig, names: Sequence[str], decayed: Collection[str] | None) -> frozenset[str]:
    """The tensors weight decay applies to: `decayed`, else those no exclusion pattern `re.search`es."""
    if config.weight_decay is None:
        return frozenset()
    if decayed is not None:
        return frozenset(decayed)
    return frozenset(name for name in names
                     if not any(re.search(pattern, name) for pattern in config.exclude_from_weight_decay))


def finalize(state: OptimizerState) -> OptimizerState:
    """tf-keras `finalize_variable_values`: with EMA, the parameters become (a copy of) the averages."""
    if state.ema is None:
        return state
    return state._replace(params=Tensors(jnp.array(state.ema.flat, copy=True), state.ema.layout))


_scheduled_rate = jax.jit(_learning_rate, static_argnums=0)


def learning_rate_at(config: OptimizerConfig, iterations: int) -> float:
    """The learning rate that the step starting at `iterations` completed steps uses (for reporting)."""
    if iterations < 0:
        raise InvalidArgument(f"iterations: must be >= 0, got {iterations}")
    if isinstance(config.learning_rate, int | float):  # the float32 constant: no device call on every push
        return float(np.float32(config.learning_rate))
    return float(_scheduled_rate(config, jnp.int32(min(iterations, _INT32_MAX))))
