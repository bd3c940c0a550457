"""The optimizer engine: tf-keras Adam as pure JAX functions (no I/O, no gRPC).

`config` parses and validates a Keras config, `schedules` evaluates the
learning-rate schedules, `adam` holds the state and the jitted step. The
numerics follow spec/keras-adam.md.
"""

from optserve.server.engine.adam import (
    AdamState,
    NormInputs,
    SparseGrad,
    finalize,
    init,
    learning_rate_at,
    make_step,
    sparse_grad,
)
from optserve.server.engine.config import AdamConfig, parse_config

__all__ = [
    "AdamConfig",
    "AdamState",
    "NormInputs",
    "SparseGrad",
    "finalize",
    "init",
    "learning_rate_at",
    "make_step",
    "parse_config",
    "sparse_grad",
]
