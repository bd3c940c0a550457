"""One server's state spread over its local devices: a 1-D device mesh, each flat slot sharded along it.

Every slot of the state is one flat float32 buffer (`FlatLayout`). Over N
devices the buffer is cut into N equal shards, each a whole number of
aligned blocks, and `spread_layout` places the tensors so that a small one
never straddles two shards (it moves to the next shard's start, leaving
padding) while a large one (over `SPLIT_FRACTION` of a shard) runs across
as many shards as it fills. One jitted step then runs over the sharded
buffers: XLA partitions it, each device updating its own shard, with the
per-tensor sums (clipnorm, global_clipnorm) combined across devices.
"""

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optserve.wire.layout import ALIGNMENT, FlatLayout

AXIS = "devices"  # the mesh's one axis
BLOCK = ALIGNMENT // 4  # float32 elements per aligned block: shards and tensors start on block boundaries
SPLIT_FRACTION = 0.25  # a tensor over this fraction of a shard is split across shards; smaller ones stay whole


class DevicesConfigError(ValueError):
    """A `--devices` value the local devices cannot satisfy; the message names the flag."""


class ShardedLayout(FlatLayout):
    """A `FlatLayout` whose buffers are sharded by `sharding`, in `shard_size`-element shards, one per device."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], offsets: Sequence[int], size: int,
                 sharding: NamedSharding):
        super().__init__(shapes, offsets, size)
        self.sharding = sharding
        self.shard_size = size // sharding.mesh.size

    def _key(self) -> tuple:
        return (*super()._key(), self.sharding)


class Placement(NamedTuple):
    """The devices one server spreads every optimizer's state over (a 1-D mesh of more than one device)."""

    mesh: Mesh

    @property
    def count(self) -> int:
        return self.mesh.size

    def layout(self, shapes: Mapping[str, tuple[int, ...]]) -> ShardedLayout:
        """The layout of tensors of `shapes` over this mesh (see `spread_offsets`)."""
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes.values()]
        offsets, size = spread_offsets(sizes, self.count)
        return ShardedLayout(shapes, offsets, size, NamedSharding(self.mesh, PartitionSpec(AXIS)))


def placement(devices: str | int, available: Sequence[jax.Device] | None = None) -> Placement | None:
    """The placement `--devices` asks for: N of the local devices, or "all"; None for one device (no mesh).

    Raises DevicesConfigError naming the flag for a count that is not a positive
    integer or exceeds the devices JAX sees.
    """
    available = list(jax.local_devices() if available is None else available)
    text = str(devices).strip().lower()
    if text == "all":
        count = len(available)
    else:
        try:
            count = int(text)
        except ValueError:
            raise DevicesConfigError(f"--devices: must be a positive integer or 'all', got {devices!r}") from None
        if count < 1:
            raise DevicesConfigError(f"--devices: must be at least 1, got {count}")
        if count > len(available):
            raise DevicesConfigError(f"--devices: {count} asked for, but JAX sees {len(available)} local device(s) "
                             f"({', '.join(describe_device(d) for d in available)})")
    if count == 1:
        return None
    return Placement(Mesh(np.array(available[:count]), (AXIS,)))


def layout_for(placement: Placement | None, params: Mapping[str, np.ndarray | Array]) -> ShardedLayout | None:
    """The layout `placement` gives tensors like `params` (in their order); None without one (the packed default)."""
    return None if placement is None else placement.layout({name: np.shape(value) for name, value in params.items()})


def spread_offsets(sizes: Sequence[int], count: int) -> tuple[list[int], int]:
    """Element offsets of tensors of `sizes` (in order) and the buffer size, for `count` equal shards.

    Shards are as small as they can be: the packed blocks divided evenly,
    grown only as far as the padding that keeps small tensors whole needs.
    A tensor of at most `SPLIT_FRACTION` of a shard that would cross a shard
    boundary starts at that boundary instead; so the padding is below that
    fraction of a shard per boundary.
    """
    blocks = [-(-size // BLOCK) for size in sizes]
    share = max(1, -(-sum(blocks) // count))  # blocks per shard
    while True:
        offsets, at = [], 0
        for length in blocks:
            whole = 0 < length <= share * SPLIT_FRACTION
            if whole and at // share != (at + length - 1) // share:
                at = (at // share + 1) * share
            offsets.append(at)
            at += length
        if at <= share * count:
            return [BLOCK * offset for offset in offsets], BLOCK * share * count
        share += max(1, math.ceil((at - share * count) / count))


def put(flat: np.ndarray | Array, layout: FlatLayout) -> Array:
    """`flat` (a buffer in `layout`) on the devices the layout is sharded over; else on jax's default device."""
    if isinstance(layout, ShardedLayout):
        return jax.device_put(flat, layout.sharding)
    return jax.device_put(flat)


def own(flat: np.ndarray, layout: FlatLayout) -> Array:
    """A state buffer: `flat` copied onto the layout's devices, into memory jax owns (so a step can donate it)."""
    if isinstance(layout, ShardedLayout):
        return jax.device_put(flat, layout.sharding)
    return jnp.array(flat, copy=True)


def filled(layout: FlatLayout, value: float) -> Array:
    """A state buffer of `layout.size` float32 `value`s, made on the layout's devices (no host copy)."""
    sharding = layout.sharding if isinstance(layout, ShardedLayout) else None
    return jnp.full(layout.size, value, jnp.float32, device=sharding)


def constrain(flat: Array, layout: FlatLayout) -> Array:
    """Inside a jitted step: `flat` keeps the layout's sharding (so the state stays spread, and is donated in place)."""
    if isinstance(layout, ShardedLayout):
        return jax.lax.with_sharding_constraint(flat, layout.sharding)
    return flat


def describe_device(device: jax.Device) -> str:
    """A device as optserve reports it: "cpu:0", "cuda:1"."""
    return f"{device.platform}:{device.id}"


def shards(flat: Array) -> list[tuple[str, int, int]]:
    """Where a flat buffer lies: (device, first element, one past the last) per shard, by first element."""
    spans = []
    for shard in flat.addressable_shards:
        index = shard.index[0] if shard.index else slice(None)
        start, stop, _ = index.indices(flat.shape[0])
        spans.append((describe_device(shard.device), start, stop))
    return sorted(spans, key=lambda span: (span[1], span[0]))
