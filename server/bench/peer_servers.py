"""The parameter servers a user already knows, on optserve's work: PyTorch RPC (TensorPipe) and a Ray actor.

Each peer runs in its own processes and does what an optserve round trip
does: a worker sends one gradient per tensor, the server applies one
`torch.optim.Adam` step (defaults but lr 1e-3, as every peer; the Ray actor
runs torch's Adam too, so the peers share one optimizer implementation), and
the worker gets the weights back. The servers answer with their live weights
(no snapshot copy), as PyTorch's parameter-server tutorial does; optserve
answers with one consistent version.

- `TorchRpcPeer("default")`: TensorPipe's own choice of transport and channel
  (shared memory and cross-memory copy where the host allows them);
  `TorchRpcPeer("tcp")`: TensorPipe restricted to loopback TCP (`uv`
  transport, `basic` channel). The parameter server is rank 0 in its own
  process, each worker a rank of its own; one `rpc_sync` is a round trip.
- `RayPeer`: an actor holding the weights; a worker passes its gradients as
  numpy arrays to an actor method (Ray puts them in its shared-memory object
  store) and `ray.get`s the weights the method returns. Ray's workers for the
  concurrent run are actors of their own, one process each.

torch and Ray are imported lazily, in the processes that use them; `missing`
names a package that is not installed, so that peer's rows say so.
"""

import importlib.util
import multiprocessing
import os
import socket
import statistics
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from optserve.server.bench.drivers import REPLY_TIMEOUT, Driver, run_workers, workers_row

LEARNING_RATE = 1e-3
TORCH_TRANSPORTS = {  # TensorPipeRpcBackendOptions keyword arguments per peer
    "default": {},
    "tcp": {"_transports": ["uv"], "_channels": ["basic"]},
}
RAY_OBJECT_STORE_BYTES = 2 * 10**9
_TORCH_PS: dict[str, dict] = {}  # the torch parameter server's state, in its own process, by layout


def missing(peer: str) -> str | None:
    """The package a peer needs that is not installed here, as its rows' error; None when it can run."""
    needs = {"torch_rpc": ("torch",), "ray": ("ray", "torch")}[peer]
    absent = [name for name in needs if importlib.util.find_spec(name) is None]
    return f"not installed: {', '.join(absent)} (pip install 'optserve[peers]')" if absent else None


def gradients(sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """One float32 gradient per tensor of `sizes`, small as real gradients are."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3) for n in sizes]


# --- PyTorch RPC ---------------------------------------------------------------


class TorchRpcPeer:
    """A PyTorch RPC parameter server and its single timed worker, each in its own process."""

    def __init__(self, transport: str, sizes_by_layout: dict[str, list[int]]):
        self.transport, self.sizes_by_layout = transport, sizes_by_layout
        self._server, port = _start_torch_ps(transport, sizes_by_layout, workers=1)
        try:
            self._driver = Driver("optserve.server.bench.peer_servers:TorchRpcWorker", port, 1, 2, transport,
                                  sizes_by_layout, 0)
        except BaseException:
            _stop(self._server)
            raise

    def round_trip(self, layout: str) -> float:
        """Seconds of one `rpc_sync` carrying the gradients there and the weights back."""
        return self._driver.round_trip(layout)

    def close(self) -> None:
        """Ends the worker (its `rpc.shutdown` lets the server's end too), then the server."""
        self._driver.close()
        _stop(self._server)

    def workers(self, count: int, seconds: float) -> dict:
        """`count` worker processes on one fresh parameter server, round trips of one tensor for `seconds`."""
        sizes = {"one": self.sizes_by_layout["one"]}
        server, port = _start_torch_ps(self.transport, sizes, workers=count)
        try:
            return run_workers("optserve.server.bench.peer_servers:TorchRpcWorker",
                               lambda i: (port, i + 1, count + 1, self.transport, sizes, 100 + i), count, "one",
                               seconds)
        finally:
            _stop(server)


class TorchRpcWorker:
    """A worker rank of the RPC group: holds its gradients as torch tensors, one `rpc_sync` per round trip."""

    def __init__(self, port: int, rank: int, world: int, transport: str, sizes_by_layout: dict[str, list[int]],
                 seed: int):
        import torch
        from torch.distributed import rpc

        self._rpc = rpc
        _quiet_torch_distributed()
        self._grads = {layout: [torch.from_numpy(g) for g in gradients(sizes, seed)]
                       for layout, sizes in sizes_by_layout.items()}
        rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world, rpc_backend_options=_rpc_options(transport, port))

    def round_trip(self, layout: str) -> None:
        """One `rpc_sync`: the gradients to the server, the weights back."""
        weights = self._rpc.rpc_sync("ps", _torch_ps_step, args=(layout, self._grads[layout]))
        if len(weights) != len(self._grads[layout]):
            raise RuntimeError(f"torch rpc: {len(weights)} weights back for {len(self._grads[layout])} gradients")

    def close(self) -> None:
        """Leaves the RPC group (graceful: waits for the others, so the server's process ends too)."""
        self._rpc.shutdown()


def _rpc_options(transport: str, port: int) -> Any:
    from torch.distributed import rpc

    return rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=16,
                                           rpc_timeout=REPLY_TIMEOUT, **TORCH_TRANSPORTS[transport])


def _start_torch_ps(transport: str, sizes_by_layout: dict[str, list[int]], workers: int) -> tuple[Any, int]:
    """Starts the parameter server (rank 0 of `workers + 1`) in its own process; returns it and the rendezvous port."""
    port = _free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=_serve_torch_ps, args=(port, workers + 1, transport, sizes_by_layout), daemon=True)
    process.start()
    return process, port


def _serve_torch_ps(port: int, world: int, transport: str, sizes_by_layout: dict[str, list[int]]) -> None:
    """Server process: zero weights and an Adam per layout, then serves until every worker has shut down."""
    import threading

    import torch
    from torch.distributed import rpc

    torch.set_num_threads(os.cpu_count() or 1)
    _quiet_torch_distributed()
    for layout, sizes in sizes_by_layout.items():
        params = [torch.zeros(n, dtype=torch.float32, requires_grad=True) for n in sizes]
        _TORCH_PS[layout] = {"params": params, "adam": torch.optim.Adam(params, lr=LEARNING_RATE),
                             "lock": threading.Lock()}
    rpc.init_rpc("ps", rank=0, world_size=world, rpc_backend_options=_rpc_options(transport, port))
    rpc.shutdown()


def _torch_ps_step(layout: str, grads: list) -> list:
    """Runs on the server: one Adam step with the gradients, then the weights as the answer."""
    state = _TORCH_PS[layout]
    with state["lock"]:
        for param, grad in zip(state["params"], grads):
            param.grad = grad
        state["adam"].step()
    return [param.detach() for param in state["params"]]


# --- Ray -------------------------------------------------------------------------


class RayPeer:
    """A Ray cluster on this host, started by its own driver process, with the parameter-server actor."""

    def __init__(self, sizes_by_layout: dict[str, list[int]]):
        self._driver = Driver("optserve.server.bench.peer_servers:RayWorker", sizes_by_layout, 0)

    def round_trip(self, layout: str) -> float:
        """Seconds of one actor call carrying the gradients there and `ray.get` of the weights back."""
        return self._driver.round_trip(layout)

    def workers(self, count: int, seconds: float) -> dict:
        """`count` worker actors (one process each) on the same actor, round trips of one tensor for `seconds`."""
        return self._driver.call("workers", count, seconds)

    def close(self) -> None:
        """Ends the driver, and with it the Ray cluster."""
        self._driver.close()


class RayWorker:
    """The Ray driver: starts a local cluster, creates the parameter-server actor, times round trips."""

    def __init__(self, sizes_by_layout: dict[str, list[int]], seed: int):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        self._ray = ray
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 object_store_memory=RAY_OBJECT_STORE_BYTES, namespace="optserve-bench")
        self._sizes = sizes_by_layout
        self._ps = ray.remote(num_cpus=0)(_RayParameterServer).remote(sizes_by_layout)
        self._grads = {layout: gradients(sizes, seed) for layout, sizes in sizes_by_layout.items()}

    def round_trip(self, layout: str) -> None:
        """One actor call with the gradients, then `ray.get` of the weights it returns."""
        weights = self._ray.get(self._ps.step.remote(layout, self._grads[layout]))
        if len(weights) != len(self._grads[layout]):
            raise RuntimeError(f"ray: {len(weights)} weights back for {len(self._grads[layout])} gradients")

    def workers(self, count: int, seconds: float) -> dict:
        """`count` worker actors released together, round trips of one tensor for `seconds`; the aggregate row."""
        ray = self._ray
        loop = ray.remote(num_cpus=0)(_RayLoop)
        actors = [loop.remote(self._ps, self._sizes["one"], 100 + i) for i in range(count)]
        try:
            ray.get([actor.warm.remote() for actor in actors], timeout=REPLY_TIMEOUT)
            start_at = time.time() + 0.5
            reports = ray.get([actor.run.remote(start_at, seconds) for actor in actors],
                              timeout=REPLY_TIMEOUT + seconds)
        finally:
            for actor in actors:
                ray.kill(actor)
        return workers_row(count, reports)

    def close(self) -> None:
        """Stops the local Ray cluster this driver started."""
        self._ray.shutdown()


class _RayParameterServer:
    """The actor: zero weights and a torch Adam per layout; `step` applies the gradients and returns the weights."""

    def __init__(self, sizes_by_layout: dict[str, list[int]]):
        import torch

        torch.set_num_threads(os.cpu_count() or 1)  # Ray caps an actor's threads at its CPUs; torch rpc's has all
        self._torch = torch
        self._params = {layout: [torch.zeros(n, dtype=torch.float32, requires_grad=True) for n in sizes]
                        for layout, sizes in sizes_by_layout.items()}
        self._adam = {layout: torch.optim.Adam(params, lr=LEARNING_RATE) for layout, params in self._params.items()}

    def step(self, layout: str, grads: list) -> list:
        params = self._params[layout]
        with warnings.catch_warnings():  # the store's arrays are read-only; Adam only reads a gradient
            warnings.simplefilter("ignore", UserWarning)
            for param, grad in zip(params, grads):
                param.grad = self._torch.from_numpy(grad)
        self._adam[layout].step()
        return [param.detach().numpy() for param in params]


class _RayLoop:
    """A worker actor of the concurrent run: its own gradients, round trips against the shared actor."""

    def __init__(self, ps: Any, sizes: list[int], seed: int):
        self._ps, self._grads = ps, gradients(sizes, seed)

    def warm(self) -> None:
        import ray

        ray.get(self._ps.step.remote("one", self._grads))

    def run(self, start_at: float, seconds: float) -> dict:
        import ray

        time.sleep(max(0.0, start_at - time.time()))
        start, latencies = time.time(), []
        while time.time() - start < seconds:
            started = time.perf_counter()
            ray.get(self._ps.step.remote("one", self._grads))
            latencies.append(time.perf_counter() - started)
        return {"round_trips": len(latencies), "start": start, "end": time.time(),
                "median_ms": statistics.median(latencies) * 1e3}


# --- helpers -------------------------------------------------------------------


def _quiet_torch_distributed() -> None:
    """torch.distributed warns about its own internal use of a deprecated API on every rendezvous: not ours to fix."""
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: Any) -> None:
    process.join(30)  # it ends by itself once its workers have shut down
    if process.is_alive():
        process.terminate()
        process.join(10)
