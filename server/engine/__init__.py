"""The optimizer engine: the tf-keras optimizer family as pure JAX functions (no I/O, no gRPC).

`config` parses and validates a Keras config (a table per class),
`schedules` evaluates the learning-rate schedules, `pipeline` holds the
state and the one jitted step (tf-keras's shared `apply_gradients`), and
`optimizers/` one module per class (its `build` and `update_step`). The
numerics follow spec/keras-adam.md and spec/keras-optimizers.md.
"""

from optserve.server.engine.config import AdamConfig, OptimizerConfig, parse_config, parse_optimizer
from optserve.server.engine.pipeline import (
    OptimizerState,
    SparseGrad,
    finalize,
    init,
    learning_rate_at,
    make_step,
    sparse_grad,
)

AdamState = OptimizerState  # the state of every class; Adam's slots read as .m, .v, .vhat

__all__ = [
    "AdamConfig",
    "AdamState",
    "OptimizerConfig",
    "OptimizerState",
    "SparseGrad",
    "finalize",
    "init",
    "learning_rate_at",
    "make_step",
    "parse_config",
    "parse_optimizer",
    "sparse_grad",
]
