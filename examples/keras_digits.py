"""A Keras 3 worker: a small model on scikit-learn's digits, trained with compiled model.fit by 2 worker processes.

    python examples/keras_digits.py                  # starts a server, runs sync then async
    python examples/keras_digits.py --address HOST:PORT --mode async
    python examples/keras_digits.py --backend tensorflow

Each worker compiles its model with `optserve.keras.RemoteOptimizer` in place of
`keras.optimizers.Adam` and calls `model.fit` (jit-compiled on the JAX backend, a
tf.function on TensorFlow's). `--backend` (jax or tensorflow; default KERAS_BACKEND,
else jax) is read before Keras loads; the spawned workers inherit it.
Needs `pip install "optserve[keras,demo]"` (TensorFlow: `[tensorflow]`; and `[server]` to start one).
"""

import argparse
import os
import sys

_backend = argparse.ArgumentParser(add_help=False)
_backend.add_argument("--backend", choices=["jax", "tensorflow"], default=os.environ.get("KERAS_BACKEND", "jax"))
_chosen, sys.argv[1:] = _backend.parse_known_args()  # the rest is digits.main's
os.environ["KERAS_BACKEND"] = _chosen.backend  # before Keras loads

import keras  # noqa: E402
import numpy as np  # noqa: E402

import digits  # noqa: E402
from optserve.client import Client  # noqa: E402
from optserve.keras import RemoteOptimizer  # noqa: E402

CONFIG = {"learning_rate": digits.LEARNING_RATE}


def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])


def worker(address: str, name: str, mode: str, index: int, workers: int, steps: int) -> None:
    x, y, _, _ = digits.load(index, workers)
    net = model()
    net.compile(optimizer=RemoteOptimizer(address, name, CONFIG, worker_id=f"worker-{index}",
                                          **digits.mode_options(mode, workers)),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    xb, yb = zip(*digits.batches(index, x, y, steps))  # the same minibatches as the other examples
    net.fit(np.concatenate(xb), np.concatenate(yb), batch_size=digits.BATCH, epochs=1, shuffle=False, verbose=0)


def accuracy(address: str, name: str) -> tuple[float, int]:
    _, _, x_test, y_test = digits.load()
    net = model()
    with Client(address) as client:
        opt = client.optimizer(name)
        net.set_weights(list(opt.pull().values()))  # "0/kernel", "1/bias", ...: the trainable variables in order
        steps = opt.info().iterations
    predicted = np.asarray(net.predict(x_test, verbose=0)).argmax(1)
    return float(np.mean(predicted == y_test)), steps


if __name__ == "__main__":
    raise SystemExit(digits.main("keras", worker, accuracy))
