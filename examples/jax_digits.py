"""A JAX/flax worker: a flax MLP on scikit-learn's digits, trained by 2 worker processes through optserve.

    python examples/jax_digits.py                    # starts a server, runs sync then async
    python examples/jax_digits.py --address HOST:PORT --mode sync

flax's parameters are a nested dict; optserve takes the pytree as it is (its
paths, "params/Dense_0/kernel", name the tensors), `jax.grad`'s gradients go
back as the same tree, and `pull(...).as_tree(params)` returns JAX arrays in
flax's structure. Needs `pip install "optserve[jax,demo]"` (and `[server]` to start one).
"""

import flax.linen as nn
import grpc
import jax
import jax.numpy as jnp
import numpy as np
import optax

import digits
from optserve.client import Client, OptserveError

CONFIG = {"learning_rate": digits.LEARNING_RATE}


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def initial_params():
    return MLP().init(jax.random.key(0), jnp.zeros((1, 64)))


@jax.jit
def gradients(params, x, y):
    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(MLP().apply(p, x), y).mean()

    return jax.grad(loss)(params)


def worker(address: str, name: str, mode: str, index: int, workers: int, steps: int) -> None:
    x, y, _, _ = digits.load(index, workers)
    params = initial_params()
    with Client(address) as client:
        opt = client.create_optimizer(name, params, CONFIG, if_exists="attach", **digits.mode_options(mode, workers))
        seq = 0
        for xb, yb in digits.batches(index, x, y, steps):
            pulled = opt.pull()
            params = pulled.as_tree(params)  # JAX arrays, flax's structure
            try:
                opt.push(gradients(params, xb, yb), worker_id=f"worker-{index}", seq=seq, base_version=pulled.version)
                seq += 1
            except OptserveError as err:
                if err.code() != grpc.StatusCode.ABORTED:  # too stale (async): drop it, the next batch re-pulls
                    raise


def accuracy(address: str, name: str) -> tuple[float, int]:
    _, _, x_test, y_test = digits.load()
    with Client(address) as client:
        opt = client.optimizer(name)
        params = opt.pull(like=initial_params())
        steps = opt.info().iterations
    predicted = np.asarray(MLP().apply(params, x_test).argmax(1))
    return float(np.mean(predicted == y_test)), steps


if __name__ == "__main__":
    raise SystemExit(digits.main("jax", worker, accuracy))
