"""What the framework examples share: scikit-learn's digits, split and sharded, a server, and worker processes.

Each example (torch_digits.py, jax_digits.py, keras_digits.py) defines a
`worker(address, name, mode, index, workers, steps)` and an `accuracy(address,
name)`, and hands them to `main`, which starts `optserve serve` unless given
`--address`, runs the workers as processes in each mode, and prints the
held-out accuracy of the weights the server holds.
"""

import argparse
import multiprocessing
import os
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np

from optserve.client import Client

TEST_SIZE = 297  # held-out digits (of 1797)
BATCH = 32
LEARNING_RATE = 0.01


def load(index: int | None = None, workers: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) as float32 pixels in [0, 1] and int labels; worker `index` gets its shard."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)
    x_train, y_train, x_test, y_test = x[TEST_SIZE:], y[TEST_SIZE:], x[:TEST_SIZE], y[:TEST_SIZE]
    if index is not None:
        x_train, y_train = x_train[index::workers], y_train[index::workers]
    return x_train, y_train, x_test, y_test


def batches(index: int, x: np.ndarray, y: np.ndarray, steps: int):
    """`steps` random minibatches of the worker's shard, the same ones on every run."""
    rng = np.random.default_rng(100 + index)
    for _ in range(steps):
        chosen = rng.choice(len(x), BATCH, replace=False)
        yield x[chosen], y[chosen]


def mode_options(mode: str, workers: int) -> dict:
    """The optimizer's training mode: sync rounds of every worker, or async with a staleness bound."""
    return {"mode": "sync", "num_workers": workers} if mode == "sync" else {"mode": "async", "max_staleness": 4}


def main(framework: str, worker: Callable, accuracy: Callable[[str, str], tuple[float, int]]) -> int:
    """Parses the command line, runs the workers in each mode and prints `[mode] held-out accuracy A after N steps`."""
    parser = argparse.ArgumentParser(description=f"Train a {framework} model on digits with optserve workers.")
    parser.add_argument("--address", help="an optserve server; default: start one")
    parser.add_argument("--mode", choices=["sync", "async", "both"], default="both")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150, help="steps per worker")
    args = parser.parse_args()
    server = None
    if args.address is None:
        from optserve.server.launch import ServerProcess  # needs optserve[server]

        server = ServerProcess(log=open(os.devnull, "w"))
    failed = 0
    with server or nullcontext():
        address = args.address or server.address
        for mode in (["sync", "async"] if args.mode == "both" else [args.mode]):
            name = f"{framework}-digits-{mode}-{os.getpid()}"
            context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked framework threads
            processes = [context.Process(target=worker, args=(address, name, mode, index, args.workers, args.steps))
                         for index in range(args.workers)]
            for process in processes:
                process.start()
            for process in processes:
                process.join(600)
                if process.is_alive():
                    process.kill()
                    process.join()
            failed += sum(process.exitcode != 0 for process in processes)
            score, steps = accuracy(address, name)
            print(f"[{mode}] held-out accuracy {score:.3f} after {steps} steps of {args.workers} workers", flush=True)
            with Client(address) as client:
                client.delete_optimizer(name)
    return 1 if failed else 0
