"""Pulled tensors: a dict by name, with the version they come from."""

from collections.abc import Mapping
from typing import Any

import numpy as np

from optserve.client import arrays, trees
from optserve.client.errors import InvalidArgumentError


class Weights(dict):
    """Tensors by name, from one version of an optimizer.

    The tensors of a pulled `Weights` are views of one aligned buffer, which
    `pull(into=...)` can fill again instead of allocating a new one.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], version: int, iterations: int,
                 buffer: np.ndarray | None = None):
        super().__init__(tensors)
        self.version = version
        self.iterations = iterations
        self._buffer = buffer  # the buffer every tensor views; None for Weights not made by a pull

    def as_tree(self, like: Any) -> Any:
        """These tensors in the structure of `like`, a pytree whose paths name them (`optserve.client.trees`).

        Each leaf comes back as its `like` leaf's type, dtype and device (torch,
        JAX, TensorFlow, NumPy); InvalidArgumentError names the first path that
        is not among these tensors, or whose shape differs.
        """
        for path in trees.flatten(like, "like"):
            if path not in self:
                raise InvalidArgumentError(f"like[{path!r}]: no such tensor among {sorted(self)[:8]}")
        return trees.unflatten(like, lambda path, leaf: arrays.like(self[path], leaf, f"like[{path!r}]"))
