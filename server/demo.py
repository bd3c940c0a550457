"""`optserve demo`: parameter-server training of a digits classifier by worker processes.

The demo starts `optserve serve` (or uses `--address`), then for each mode
(sync, then async with a staleness bound) creates an Adam optimizer with an
EMA of the weights and starts N worker *processes*. Each worker holds its own
shard of scikit-learn's bundled handwritten digits, computes gradients of a
two-layer network with NumPy, and pushes them with (worker_id, seq,
base_version). The parent follows the optimizer's versions with waiting pulls,
draws a progress bar, records held-out loss and accuracy, and finally reports
the accuracy of the raw and EMA weights and writes a PNG plot of both modes.
Workers import only the client (no JAX).
"""

import io
import multiprocessing
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import grpc
import numpy as np

from optserve.client import Client, OptserveError
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
BATCH = 32
EVAL_POINTS = 20  # held-out evaluations per phase


def run_demo(workers: int = 4, steps: int = 200, modes: tuple[str, ...] = ("sync", "async"), max_staleness: int = 4,
             plot: str = "optserve-demo.png", address: str | list[str] | None = None, tag: str = "") -> int:
    """Runs the demo; returns a process exit status."""
    server = None if address else ServerProcess(log=io.StringIO())  # keeps the bars readable
    histories = {}
    with server or nullcontext():
        address = address or server.address
        print(f"optserve at {address}; {workers} worker processes, {steps} steps per mode")
        for mode in modes:
            histories[mode] = _train(address, mode, workers, steps, max_staleness, tag)
    if server is not None:
        print(f"server stopped on SIGTERM, exit status {server.process.returncode}")
    if plot:
        _plot(histories, Path(plot))
        print(f"wrote the loss and accuracy plot to {Path(plot).resolve()}")
    return 0 if server is None or server.process.returncode == 0 else 1


def _train(address: str | list[str], mode: str, workers: int, steps: int, max_staleness: int, tag: str) -> dict:
    """One phase: create the optimizer, run the workers, follow the versions, report."""
    x_train, y_train, x_test, y_test = _digits()
    name = f"digits-{mode}-{tag}" if tag else f"digits-{mode}"
    settings = {"mode": "sync", "num_workers": workers} if mode == "sync" else {"max_staleness": max_staleness}
    client = Client(address, timeout=120.0)
    opt = client.create_optimizer(name, _init_params(), CONFIG, **settings)
    print(f"\n[{mode}] optimizer {name!r} on {opt.info().device}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    context = multiprocessing.get_context("spawn")  # real processes, no state inherited from the parent
    refused = context.Value("i", 0)
    pushes = steps if mode == "sync" else -(-steps // workers)  # async: the workers share the steps
    procs = [context.Process(target=_worker, args=(address, name, mode, w, workers, pushes, refused))
             for w in range(workers)]
    for proc in procs:
        proc.start()
    history = {"version": [], "loss": [], "accuracy": []}
    started = time.perf_counter()
    total = steps if mode == "sync" else pushes * workers
    for target in np.unique(np.linspace(1, total, EVAL_POINTS).astype(int)):
        weights = opt.pull(min_version=int(target), timeout=300)
        loss, _ = _loss_and_grads(weights, x_test, y_test)
        history["version"].append(weights.version)
        history["loss"].append(loss)
        history["accuracy"].append(_accuracy(weights, x_test, y_test))
        _progress(mode, weights.version, total, f"held-out loss {loss:.3f}")
    for proc in procs:
        proc.join(timeout=300)
    failed = [proc.exitcode for proc in procs if proc.exitcode != 0]
    if failed:
        raise RuntimeError(f"[{mode}] {len(failed)} worker process(es) failed: exit codes {failed}")
    elapsed = time.perf_counter() - started
    info = opt.info()
    print(f"\n[{mode}] {info.iterations} Adam steps in {elapsed:.1f} s; stale pushes refused and redone: "
          f"{refused.value}")
    raw, ema = _accuracy(opt.pull(), x_test, y_test), _accuracy(opt.pull(ema=True), x_test, y_test)
    print(f"[{mode}] held-out accuracy: raw weights {raw:.3f}, EMA weights {ema:.3f}")
    history.update(raw_accuracy=raw, ema_accuracy=ema)
    client.delete_optimizer(name)
    client.close()
    return history


def _worker(address: str | list[str], name: str, mode: str, index: int, workers: int, pushes: int, refused) -> None:
    """A worker process: pull, compute a gradient on its own shard, push; exactly once per seq."""
    x_train, y_train, _, _ = _digits()
    x_shard, y_shard = x_train[index::workers], y_train[index::workers]
    rng = np.random.default_rng(index)
    opt = Client(address, timeout=120.0).optimizer(name)
    weights = opt.pull()
    seq = 0
    while seq < pushes:
        batch = rng.integers(0, len(x_shard), BATCH)
        _, grads = _loss_and_grads(weights, x_shard[batch], y_shard[batch])
        try:
            result = opt.push(grads, worker_id=f"worker-{index}", seq=seq, base_version=weights.version)
        except OptserveError as err:
            if err.code() != grpc.StatusCode.ABORTED:  # stale: pull the news and compute again
                raise
            with refused.get_lock():
                refused.value += 1
            weights = opt.pull()
            continue
        seq += 1
        weights = opt.pull(min_version=int(result)) if mode == "sync" else opt.pull()


def _init_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "dense_1/kernel": rng.normal(0, (2 / 64) ** 0.5, (64, HIDDEN)).astype(np.float32),
        "dense_1/bias": np.zeros(HIDDEN, np.float32),
        "dense_2/kernel": rng.normal(0, (1 / HIDDEN) ** 0.5, (HIDDEN, 10)).astype(np.float32),
        "dense_2/bias": np.zeros(10, np.float32),
    }


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (no download), shuffled, 80% train / 20% held out."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target
    order = np.random.default_rng(1).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return x[:split], y[:split], x[split:], y[split:]


def _forward(w: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hidden = np.maximum(x @ w["dense_1/kernel"] + w["dense_1/bias"], 0)
    return hidden, hidden @ w["dense_2/kernel"] + w["dense_2/bias"]


def _loss_and_grads(w: dict, x: np.ndarray, y: np.ndarray) -> tuple[float, dict]:
    """Softmax cross-entropy of the two-layer ReLU network, and its gradients."""
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


def _progress(label: str, done: int, total: int, note: str, width: int = 30) -> None:
    filled = width * min(done, total) // total
    bar = "#" * filled + "." * (width - filled)
    end = "" if sys.stdout.isatty() else "\n"
    print(f"\r[{label}] [{bar}] {min(done, total):4d}/{total}  {note}", end=end, flush=True)


def _plot(histories: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, history in histories.items():
        loss_ax.plot(history["version"], history["loss"], marker="o", ms=3, label=mode)
        acc_ax.plot(history["version"], history["accuracy"], marker="o", ms=3,
                    label=f"{mode} (final raw {history['raw_accuracy']:.3f}, EMA {history['ema_accuracy']:.3f})")
    loss_ax.set(title="held-out loss", xlabel="optimizer version (Adam steps)", ylabel="cross-entropy")
    acc_ax.set(title="held-out accuracy (raw weights)", xlabel="optimizer version (Adam steps)", ylabel="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("optserve: Keras Adam as a service, digits MLP trained by worker processes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
