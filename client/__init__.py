"""optserve's Python client: needs grpcio, protobuf and NumPy, never JAX.

    from optserve.client import Client, IndexedSlices
    client = Client("127.0.0.1:50051")
    opt = client.create_optimizer("mlp", params, {"learning_rate": 1e-3})
    version = opt.push(grads)
    weights = opt.pull()
"""

from optserve.client.client import (
    Client,
    IndexedSlices,
    InvalidArgumentError,
    Optimizer,
    OptimizerInfo,
    OptserveError,
    PushResult,
    Weights,
)
from optserve.client.security import TLS

__all__ = ["Client", "IndexedSlices", "InvalidArgumentError", "Optimizer", "OptimizerInfo", "OptserveError", "PushResult", "TLS", "Weights"]
