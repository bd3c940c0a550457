"""One optimizer as a shard of a logical optimizer over several servers: its place, and its share of the clip.

A shard is an ordinary optimizer whose tensors are its pieces of the
placement table (`optserve.wire.placement`). This module checks a create
against the table, matches weight-decay exclusions on the logical tensor
names, and turns a push's `norm_inputs` (the other shards' sums of squares)
into the engine's `NormInputs`.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

from optserve.server import patterns
from optserve.server.engine import pipeline
from optserve.server.engine.config import OptimizerConfig
from optserve.server.errors import FailedPrecondition, InvalidArgument
from optserve.wire import placement as placements
from optserve.wire.placement import Piece, Placement

if TYPE_CHECKING:  # modes imports this module
    from optserve.server.modes import Gradient, TrainingMode


@dataclass(frozen=True)
class Shard:
    """Where one optimizer sits: shard `index` of `placement`."""

    index: int
    placement: Placement

    @property
    def pieces(self) -> list[Piece]:
        """This shard's pieces, in its layout order."""
        return self.placement.of_shard(self.index)

    @property
    def digest(self) -> str:
        return placements.digest(self.placement)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for a checkpoint's metadata."""
        return {"index": self.index, **placements.to_dict(self.placement)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Shard":
        return cls(int(data["index"]), placements.from_dict(data))


@dataclass(frozen=True)
class ShardNorms:
    """A push's `norm_inputs`: sums of squares of the gradient's parts that other shards hold."""

    global_square_sum: float
    tensor_square_sums: dict[str, float]  # piece name -> the sum of squares of its tensor's other pieces

    def to_dict(self) -> dict[str, Any]:
        return {"global_square_sum": self.global_square_sum, "tensor_square_sums": dict(self.tensor_square_sums)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShardNorms":
        return cls(float(data["global_square_sum"]), {k: float(v) for k, v in data["tensor_square_sums"].items()})


def check_table(shard: Shard) -> None:
    """INVALID_ARGUMENT unless the table is whole and `index` is one of its shards."""
    try:
        placements.check(shard.placement)
    except ValueError as err:
        raise InvalidArgument(str(err)) from None
    if not 0 <= shard.index < shard.placement.count:
        raise InvalidArgument(f"shard.index: must be in [0, {shard.placement.count}), got {shard.index}")


WHOLE_TENSOR_CLASSES = ("Adafactor",)  # classes whose update reads a whole tensor (its factors, its RMS)


def check_create(shard: Shard, shapes: Mapping[str, Sequence[int]], config: OptimizerConfig, mode: "TrainingMode") -> None:
    """Refuses a shard whose tensors are not its pieces of the table, or settings it cannot serve exactly.

    INVALID_ARGUMENT for tensors that differ from the table; FAILED_PRECONDITION
    for sync mode with backup workers (each shard would pick its own first K).
    """
    check_table(shard)
    wanted = [(piece.name, piece.shape) for piece in shard.pieces]
    got = [(name, tuple(shape)) for name, shape in shapes.items()]
    if got != wanted:
        raise InvalidArgument(f"tensors: shard {shard.index} of the table holds {wanted}, the create sends {got}")
    split = [p for p in shard.pieces if p.tensor_shape and p.stop - p.start != p.tensor_shape[0]]
    if split and config.class_name in WHOLE_TENSOR_CLASSES:
        raise InvalidArgument(f"max_shard_bytes: {config.class_name} needs each tensor whole on one shard (its "
                              f"factored moments and relative step read the whole tensor), but {split[0].tensor!r} "
                              f"is split; raise max_shard_bytes above its size")
    if shard.placement.count == 1 or mode.mode != "sync":
        return
    if mode.backup_workers:
        raise FailedPrecondition("training_mode.backup_workers: a sync optimizer over several shards takes no "
                                 "backup workers (each shard would close its round with its own first gradients)")


def is_two_phase(config: OptimizerConfig, mode: "TrainingMode", shard: Shard | None) -> bool:
    """Whether this optimizer's sync rounds are prepared, then committed with the other shards' sums of squares.

    The combined round's norm is known to no worker and no shard: each shard
    reports its part when its round closes, and the commit brings the rest.
    """
    return shard is not None and mode.mode == "sync" and needs_norm_inputs(config, shard.placement)


def round_square_sums(shard: Shard, grads: Mapping[str, "Gradient"]) -> ShardNorms:
    """A closed round's own sums of squares: of all its pieces, and of each split piece (float32, in layout order)."""
    sums = {}
    for piece in shard.pieces:
        grad = grads[piece.name]
        values = grad[1] if isinstance(grad, tuple) else grad
        sums[piece.name] = np.sum(np.square(np.asarray(values, np.float32)), dtype=np.float32)
    total = np.float32(sum(sums.values(), np.float32(0)))
    return ShardNorms(float(total), {piece.name: float(sums[piece.name]) for piece in shard.pieces if not piece.whole})


def needs_norm_inputs(config: OptimizerConfig, placement: Placement) -> bool:
    """Whether a step of a shard of `placement` needs other shards' sums of squares to clip as Keras does."""
    if placement.count == 1:
        return False
    if config.global_clipnorm is not None:
        return True
    return config.clipnorm is not None and any(not piece.whole for piece in placement.pieces)


def excluded_from_decay(config: OptimizerConfig, shard: Shard) -> frozenset[str]:
    """The pieces weight decay skips: those whose logical tensor an exclusion pattern matches."""
    if config.weight_decay is None or not config.exclude_from_weight_decay:
        return frozenset()
    pieces = shard.pieces
    tensors = list(dict.fromkeys(piece.tensor for piece in pieces))
    excluded = patterns.excluded_names(config.exclude_from_weight_decay, tensors)
    return frozenset(piece.name for piece in pieces if piece.tensor in excluded)


def engine_norm_inputs(shard: Shard | None, config: OptimizerConfig, names: Sequence[str],
                       norms: ShardNorms | None) -> pipeline.NormInputs | None:
    """The engine's `NormInputs` for a push to this optimizer; INVALID_ARGUMENT when missing, stray or bad."""
    if shard is None:
        if norms is not None:
            raise InvalidArgument("norm_inputs: this optimizer is no shard of a logical optimizer")
        return None
    if norms is None:
        if needs_norm_inputs(config, shard.placement):
            raise InvalidArgument(f"norm_inputs: required: shard {shard.index} of {shard.placement.count} clips by "
                                  f"the whole gradient's norm, and holds only part of it")
        return None
    split = {piece.name for piece in shard.pieces if not piece.whole}
    values = [("global_square_sum", norms.global_square_sum)]
    for name, value in norms.tensor_square_sums.items():
        if name not in split:
            raise InvalidArgument(f"norm_inputs.tensor_square_sums[{name!r}]: not a piece of a split tensor on "
                                  f"shard {shard.index}")
        values.append((f"tensor_square_sums[{name!r}]", value))
    for field, value in values:
        if not (math.isfinite(value) and value >= 0):
            raise InvalidArgument(f"norm_inputs.{field}: must be finite and >= 0, got {value}")
    if config.clipnorm is not None:
        missing = sorted(split - set(norms.tensor_square_sums))
        if missing:
            raise InvalidArgument(f"norm_inputs.tensor_square_sums[{missing[0]!r}]: required (clipnorm of a split "
                                  f"tensor uses the whole tensor's norm)")
    offsets = np.array([norms.tensor_square_sums.get(name, 0.0) for name in names], np.float32)
    return pipeline.NormInputs(jnp.float32(norms.global_square_sum), jnp.asarray(offsets))
