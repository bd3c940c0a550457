"""Two-phase sync rounds of a shard that clips by the whole gradient's norm: prepared, then committed.

A shard whose round is full combines it and answers its pushes with its own
sums of squares (`PreparedRound`); the workers send every shard the others'
sums, and the first such commit applies the round (`CommittedRound` answers
the repeats). The optimizer keeps one of each, under its lock.
"""

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from optserve.server import overflow
from optserve.server.modes import PushResult, RoundGradients
from optserve.server.sharding import ShardNorms


@dataclass(frozen=True)
class PreparedRound:
    """A two-phase sync round, closed and combined, waiting for its commit."""

    version: int  # the version its commit makes
    grads: RoundGradients
    workers: list[tuple[str, int]]
    magnitudes: list[overflow.Magnitude]
    sums: ShardNorms  # this shard's own sums of squares of the combined gradient
    values: Mapping[str, np.ndarray]  # the round's means of the non-trainable tensors


@dataclass(frozen=True)
class CommittedRound:
    """The newest committed two-phase round: what a repeated commit or a retried push is answered with."""

    version: int
    norms: ShardNorms  # the other shards' sums it was committed with
    sums: ShardNorms  # this shard's own
    iterations: int

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "norms": self.norms.to_dict(), "sums": self.sums.to_dict(),
                "iterations": self.iterations}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CommittedRound":
        return cls(int(data["version"]), ShardNorms.from_dict(data["norms"]), ShardNorms.from_dict(data["sums"]),
                   int(data["iterations"]))


def answer(result: PushResult, prepared: PreparedRound | None, committed: CommittedRound | None, version: int,
           next_iterations: int) -> PushResult:
    """A sync push's answer, with its round's sums of squares when that round is prepared or committed.

    `version` is the shard's current version; `next_iterations` the iterations its commit would make.
    """
    if prepared is not None and prepared.version == result.version and version < result.version:
        return replace(result, prepared=True, iterations=next_iterations, round_square_sums=prepared.sums)
    if committed is not None and committed.version == result.version:
        return replace(result, iterations=committed.iterations, round_square_sums=committed.sums)
    return result
