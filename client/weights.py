"""Pulled tensors: a dict by name, with the version they come from."""

from collections.abc import Mapping

import numpy as np


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
