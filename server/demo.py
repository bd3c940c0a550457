"""`optserve demo`: trains a small network on handwritten digits through a live server.

It starts `optserve serve` as a child process (or uses `--address`), creates
an Adam optimizer with an EMA of the weights, and runs a NumPy training loop
that only computes gradients: every step pushes them and pulls the new
weights back. It prints the loss going down and the held-out accuracy of the
raw and the EMA weights.
"""

import time
from contextlib import nullcontext

import numpy as np

from optserve.client import Client
from optserve.server.launch import ServerProcess

CONFIG = {
    "learning_rate": {"class_name": "ExponentialDecay",
                      "config": {"initial_learning_rate": 0.01, "decay_steps": 100, "decay_rate": 0.7}},
    "weight_decay": 1e-4,
    "exclude_from_weight_decay": ["bias"],
    "global_clipnorm": 5.0,
    "use_ema": True,
    "ema_momentum": 0.95,
}
HIDDEN = 64
BATCH = 64


def run_demo(steps: int = 300, address: str | None = None) -> int:
    """Runs the demo; returns a process exit status."""
    x_train, y_train, x_test, y_test = _digits()
    rng = np.random.default_rng(0)
    params = {
        "dense_1/kernel": rng.normal(0, (2 / 64) ** 0.5, (64, HIDDEN)).astype(np.float32),
        "dense_1/bias": np.zeros(HIDDEN, np.float32),
        "dense_2/kernel": rng.normal(0, (1 / HIDDEN) ** 0.5, (HIDDEN, 10)).astype(np.float32),
        "dense_2/bias": np.zeros(10, np.float32),
    }
    server = None if address else ServerProcess()
    with server or nullcontext():
        address = address or server.address
        client = Client(address, timeout=60.0)
        print(f"connected to optserve at {address}")
        opt = client.create_optimizer("digits-mlp", params, CONFIG)
        info = opt.info()
        print(f"optimizer {info.name!r} on {info.device}: {len(info.tensors)} tensors, "
              f"{sum(int(np.prod(s)) for s, _ in info.tensors.values())} parameters")
        weights = opt.pull()
        started = time.perf_counter()
        for step in range(1, steps + 1):
            batch = rng.integers(0, len(x_train), BATCH)
            loss, grads = _loss_and_grads(weights, x_train[batch], y_train[batch])
            opt.push(grads)
            weights = opt.pull()
            if step % 25 == 0 or step == 1:
                test_loss, _ = _loss_and_grads(weights, x_test, y_test)
                print(f"step {step:4d}/{steps}  batch loss {loss:.4f}  held-out loss {test_loss:.4f}  "
                      f"{_bar(step, steps)}", flush=True)
        elapsed = time.perf_counter() - started
        print(f"{steps} push+pull round trips in {elapsed:.2f} s ({steps / elapsed:.0f} steps/s)")
        print(f"held-out accuracy, raw weights: {_accuracy(opt.pull(), x_test, y_test):.3f}")
        print(f"held-out accuracy, EMA weights: {_accuracy(opt.pull(ema=True), x_test, y_test):.3f}")
        opt.finalize()
        print(f"finalized (EMA copied into the weights), version {opt.info().version}")
        client.delete_optimizer("digits-mlp")
        client.close()
    if server is not None:
        if server.process.returncode != 0:
            print(f"server exited with status {server.process.returncode}")
            return 1
        print("server stopped cleanly on SIGTERM")
    return 0


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships inside scikit-learn: no download

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target
    order = np.random.default_rng(1).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return x[:split], y[:split], x[split:], y[split:]


def _forward(w: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hidden = np.maximum(x @ w["dense_1/kernel"] + w["dense_1/bias"], 0)
    logits = hidden @ w["dense_2/kernel"] + w["dense_2/bias"]
    return hidden, logits


def _loss_and_grads(w: dict, x: np.ndarray, y: np.ndarray) -> tuple[float, dict]:
    """Softmax cross-entropy of a two-layer ReLU network, and its gradients."""
    hidden, logits = _forward(w, x)
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    loss = float(-np.log(probs[np.arange(len(y)), y] + 1e-12).mean())
    d_logits = probs
    d_logits[np.arange(len(y)), y] -= 1
    d_logits /= len(y)
    d_hidden = (d_logits @ w["dense_2/kernel"].T) * (hidden > 0)
    grads = {
        "dense_1/kernel": x.T @ d_hidden,
        "dense_1/bias": d_hidden.sum(axis=0),
        "dense_2/kernel": hidden.T @ d_logits,
        "dense_2/bias": d_logits.sum(axis=0),
    }
    return loss, grads


def _accuracy(w: dict, x: np.ndarray, y: np.ndarray) -> float:
    return float((_forward(w, x)[1].argmax(axis=1) == y).mean())


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total
    return "[" + "#" * filled + "." * (width - filled) + "]"
