"""What an optimizer's checkpoint holds, and the optimizer's parts read back from one.

A checkpoint is its metadata (name, class, config, settings, counters, the
exactly-once table, the names weight decay skips, the optimizer-wide scalars)
and its tensors by slot (`pipeline.export`). A checkpoint written before the
family has no class: it is Adam's. Writing and reading files is `storage`'s.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

from optserve.server.engine import devices, pipeline
from optserve.server.engine.config import OptimizerConfig, parse_config
from optserve.server.engine.optimizers import core_of
from optserve.server.modes import TrainingMode
from optserve.server.sharding import Shard
from optserve.server.storage import Checkpoint


class Contents(NamedTuple):
    """An optimizer as a checkpoint records it."""

    name: str
    config: OptimizerConfig
    non_finite_policy: str
    training_mode: TrainingMode
    state: pipeline.OptimizerState
    iterations: int
    version: int
    dedup: Mapping[str, list[list[int]]]  # `DedupTable.to_json`
    excluded_from_decay: list[str] | None  # the names matched at create; None in checkpoints from before
    non_trainable: tuple[str, ...] = ()  # tensors of non-trainable state (assigned by pushes, never stepped)
    shard: Shard | None = None  # its place in a logical optimizer over several servers
    committed_round: Mapping[str, Any] | None = None  # a sync shard's newest two-phase commit, as a dict


def checkpoint_of(contents: Contents) -> Checkpoint:
    """The checkpoint of `contents` (host copies of every tensor)."""
    meta: dict[str, Any] = {
        "name": contents.name,
        "optimizer": contents.config.class_name,
        "config": contents.config.to_keras_dict(),
        "scalars": pipeline.export_scalars(contents.state),  # optimizer-wide state (Nadam: u_product)
        "non_finite_policy": contents.non_finite_policy,
        "training_mode": contents.training_mode.to_dict(),
        "names": list(pipeline.layout_of(contents.state).shapes),
        "iterations": contents.iterations,
        "version": contents.version,
        "dedup": dict(contents.dedup),
        "excluded_from_weight_decay": sorted(contents.excluded_from_decay or ()),  # matched once, at create
        "non_trainable": sorted(contents.non_trainable),
        "shard": None if contents.shard is None else contents.shard.to_dict(),
        "committed_round": contents.committed_round,
    }
    return Checkpoint(meta, pipeline.export(contents.state))


def contents_of(checkpoint: Checkpoint, placement: devices.Placement | None = None) -> Contents:
    """What `checkpoint` records, its state back on the device (spread by `placement`, if any);
    InvalidArgument if its config no longer parses."""
    meta = checkpoint.meta
    slots = {slot: {name: tensors[name] for name in meta["names"] if name in tensors}  # in creation order
             for slot, tensors in checkpoint.slots.items()}
    config = parse_config(meta["config"], meta.get("optimizer", "Adam"))  # data dirs before the family: Adam
    scalars = {**core_of(config).scalars, **meta.get("scalars", {})}
    return Contents(meta["name"], config, meta["non_finite_policy"], TrainingMode(**meta["training_mode"]),
                    pipeline.restore(meta["iterations"], slots, scalars, config,
                                     devices.layout_for(placement, slots["params"])),
                    meta["iterations"], meta["version"], meta["dedup"], meta.get("excluded_from_weight_decay"),
                    tuple(meta.get("non_trainable", ())),
                    Shard.from_dict(meta["shard"]) if meta.get("shard") else None, meta.get("committed_round"))
