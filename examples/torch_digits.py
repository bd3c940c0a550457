"""A PyTorch worker: a small network on scikit-learn's digits, trained by 2 worker processes through optserve.

    python examples/torch_digits.py                  # starts a server, runs sync then async
    python examples/torch_digits.py --address HOST:PORT --mode async --workers 4

Each worker is plain PyTorch with `optserve.torch.RemoteOptimizer` in place of
`torch.optim.Adam`; the first worker to arrive creates the optimizer, the other
attaches. Needs `pip install "optserve[torch,demo]"` (and `[server]` to start one).
"""

import numpy as np
import torch

import digits
from optserve.client import Client
from optserve.torch import RemoteOptimizer

CONFIG = {"learning_rate": digits.LEARNING_RATE, "epsilon": 1e-8, "adaptive_epsilon": True}  # torch.optim.Adam's


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def worker(address: str, name: str, mode: str, index: int, workers: int, steps: int) -> None:
    torch.set_num_threads(1)
    x, y, _, _ = digits.load(index, workers)
    net = model()
    opt = RemoteOptimizer(net, address, name, CONFIG, worker_id=f"worker-{index}",
                          **digits.mode_options(mode, workers))
    with opt:
        for xb, yb in digits.batches(index, x, y, steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(torch.from_numpy(xb)), torch.from_numpy(yb)).backward()
            if mode == "async":
                opt.step_async()  # the next batch computes while this push travels
            else:
                opt.step()


def accuracy(address: str, name: str) -> tuple[float, int]:
    _, _, x_test, y_test = digits.load()
    net = model()
    with Client(address) as client:
        opt = client.optimizer(name)
        net.load_state_dict(opt.pull(like=dict(net.named_parameters())))
        steps = opt.info().iterations
    with torch.no_grad():
        predicted = net(torch.from_numpy(x_test)).argmax(1).numpy()
    return float(np.mean(predicted == y_test)), steps


if __name__ == "__main__":
    raise SystemExit(digits.main("torch", worker, accuracy))
