"""`optserve bench`: measurements taken side by side in one run, as tables, JSON and a PNG plot.

Every figure is compared with a reference measured in the same run, on the
same machine, because absolute figures drift between runs on a shared
machine. One function per section, each returning a plain dict:

- `measure_bandwidth`: the best streaming memory bandwidth (NumPy copy, add
  and triad on the host; the same kernels jitted by JAX on its device), the
  fastest repetition of the fastest kernel. An Adam step must at least read
  param, m, v and the gradient and write param, m and v: 28 bytes per
  parameter, so `28 * params / bandwidth` is the floor of a step.
- `measure_step`: the server's jitted, donating step (`engine.adam.make_step`,
  default Keras config) and `optax.adam` (jitted, donated) on the same
  tensors, one flat tensor and 100 mixed-size tensors, against that floor.
- `measure_transfer`: push and pull through a server process against a bare
  gRPC service of 1 MB `bytes` chunks and raw TCP over loopback, both served
  by child processes of the bench. A push is timed as a client sees it,
  so it includes the server's step (reported beside it).
- `measure_round_trip`: push + pull, float32 and bfloat16 gradients on the
  wire, split into compute (the server's own `optserve_step_seconds`),
  (de)serialization (the real client and server codec run on the same
  tensors in the bench process, transport left out) and transfer (the rest).
- `measure_workers`: 1, 2, 4 worker processes pushing to one optimizer.
- `measure_memory`: the server's peak RSS against the state it holds, and its
  RSS over a long run of pushes.
- `measure_durability`: what each durability mode costs a push.

Targets are printed as met / not met with their ratio; they are never
asserted (CI runs `--quick` as a smoke test only).
"""

import gc
import io
import json
import multiprocessing
import os
import platform
import re
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optserve.client import Client
from optserve.client.wire import CHUNK_BYTES
from optserve.server.launch import ServerProcess

MB = 1_000_000
BYTES_PER_PARAM = 28  # one Adam step reads param, m, v, grad (16 bytes) and writes param, m, v (12 bytes)
STATE_BYTES_PER_PARAM = 12  # params, m and v in float32 (default config: no AMSGrad, no EMA)
CLIENT_TIMEOUT = 600.0
RAW_SERVICE = "optserve.bench.Raw"  # the bare gRPC service: /optserve.bench.Raw/Push and /Pull
RAW_OPTIONS = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]
RSS_GROWTH_LIMIT = 16 * MB  # "no growth": at most this much between the end of warm-up and the last push
DURABILITY_MODES = {
    "memory": [],
    "wal": ["--durability", "wal"],
    "none": ["--durability", "none"],
}


@dataclass(frozen=True)
class Plan:
    """Sizes and repetitions of one run."""

    bandwidth_bytes: int  # bytes of each array the bandwidth kernels stream
    bandwidth_reps: int
    step_params: tuple[int, ...]
    step_reps: int
    transfer_mb: tuple[int, ...]
    transfer_target_mb: int  # the size whose ratios are held against the targets
    transfer_reps: int
    round_trip_params: int
    round_trip_reps: int
    worker_counts: tuple[int, ...]
    worker_params: int
    worker_seconds: float
    peak_params: int
    growth_params: int
    growth_pushes: int
    durability_params: int
    durability_pushes: int
    chunk_kib: tuple[int, ...] = (256, 512, 1024, 2048, 3584)  # client chunk sizes compared
    chunk_mb: int = 40  # push size of the chunk-size comparison


QUICK = Plan(bandwidth_bytes=128 * MB, bandwidth_reps=3, step_params=(1_000_000,), step_reps=5,
             transfer_mb=(4, 16), transfer_target_mb=16, transfer_reps=5,
             round_trip_params=1_000_000, round_trip_reps=5,
             worker_counts=(1, 2, 4), worker_params=1_000_000, worker_seconds=1.0,
             peak_params=1_000_000, growth_params=1_000_000, growth_pushes=200,
             durability_params=1_000_000, durability_pushes=10, chunk_kib=(256, 1024, 3584), chunk_mb=16)
FULL = Plan(bandwidth_bytes=256 * MB, bandwidth_reps=7, step_params=(1_000_000, 10_000_000, 50_000_000), step_reps=11,
            transfer_mb=(4, 40, 200), transfer_target_mb=40, transfer_reps=9,
            round_trip_params=10_000_000, round_trip_reps=15,
            worker_counts=(1, 2, 4), worker_params=10_000_000, worker_seconds=6.0,
            peak_params=50_000_000, growth_params=1_000_000, growth_pushes=2000,
            durability_params=10_000_000, durability_pushes=30)


def run_bench(quick: bool = False, json_path: str | None = None,
              plot_path: str | None = "optserve-bench.png") -> int:
    """Runs every section, prints a table per section, writes the JSON and the plot; returns an exit status."""
    missing = [name for name in ("optax", "psutil", "matplotlib") if not _importable(name)]
    if missing:
        print(f"optserve bench needs {', '.join(missing)}: pip install 'optserve[server,bench]'")
        return 2
    _quiet_gpu_preallocation()
    plan = QUICK if quick else FULL
    started = time.perf_counter()
    results: dict[str, Any] = {"quick": quick, "plan": asdict(plan)}

    results["environment"] = env = measure_environment()
    _print_table("environment", ["item", "value"], [[k, str(v)] for k, v in env.items()], target=False)

    results["bandwidth"] = bw = measure_bandwidth(plan.bandwidth_bytes, plan.bandwidth_reps, env["platform"])
    _print_bandwidth(bw)

    results["step"] = measure_step(plan.step_params, plan.step_reps, bw["best_gb_s"])
    _print_step(results["step"])
    gc.collect()

    raw_grpc, raw_tcp = RawGrpc(), RawTcp()
    try:
        with ServerProcess(["--metrics-port", "0"], log=io.StringIO()) as server:
            metrics = ServerMetrics(server)
            env["server_device"] = _server_device(server)
            print(f"\nserver process: {server.address}, JAX device {env['server_device']}", flush=True)
            results["transfer"] = measure_transfer(server.address, metrics, raw_grpc, raw_tcp, plan.transfer_mb,
                                                   plan.transfer_reps, plan.transfer_target_mb)
            _print_transfer(results["transfer"])
            print(results["transfer"]["note"])
            results["round_trip"] = measure_round_trip(server.address, metrics, raw_tcp, plan.round_trip_params,
                                                       plan.round_trip_reps, bw["best_gb_s"])
            _print_round_trip(results["round_trip"])
            results["workers"] = measure_workers(server.address, plan.worker_counts, plan.worker_params,
                                                 plan.worker_seconds)
            _print_workers(results["workers"])
            results["chunk_size"] = measure_chunk_sizes(server.address, plan.chunk_mb, plan.chunk_kib,
                                                        plan.transfer_reps)
            _print_table(f"push {plan.chunk_mb} MB by client chunk size (medians)", ["chunk KiB", "push ms", "MB/s"],
                         [[str(r["chunk_kib"]), f"{r['push_ms']:.1f}", f"{r['mb_s']:.0f}"]
                          for r in results["chunk_size"]["rows"]], target=False)
    finally:
        raw_grpc.close()
        raw_tcp.close()

    results["memory"] = measure_memory(plan.peak_params, plan.growth_params, plan.growth_pushes)
    _print_memory(results["memory"])

    results["durability"] = measure_durability(plan.durability_params, plan.durability_pushes)
    _print_durability(results["durability"], plan)

    results["targets"] = targets = [t for section in ("step", "transfer", "round_trip", "workers", "memory")
                                    for t in results[section]["targets"]]
    results["elapsed_s"] = time.perf_counter() - started
    env["load_average_at_end"] = _load_average()
    _print_table("targets", ["section", "target", "result"],
                 [[t["section"], t["name"]] + [_target_text(t)] for t in targets])
    met = sum(t["met"] for t in targets)
    print(f"\n{met} of {len(targets)} targets met; bench took {results['elapsed_s']:.0f} s "
          f"on {env['device']} ({'quick' if quick else 'full'} run; load average {env['load_average_at_start']} "
          f"at the start, {env['load_average_at_end']} at the end)")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
        print(f"wrote {json_path}")
    if plot_path:
        write_plot(results, plot_path)
        print(f"wrote {plot_path}")
    return 0


# --- environment and memory bandwidth ----------------------------------------


def measure_environment() -> dict:
    """The device JAX runs on here (the server's child processes see the same) and the host."""
    import jax
    import psutil

    device = jax.devices()[0]
    return {
        "device": f"{device.platform}:{device.id} ({device.device_kind})",
        "platform": device.platform,
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "host_memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "load_average_at_start": _load_average(),  # other work on the machine skews every figure
    }


def measure_bandwidth(nbytes: int, reps: int, device_platform: str) -> dict:
    """Streaming bandwidth in GB/s (1e9 bytes), counted as the bytes each kernel must read and write.

    On the CPU the host kernels and JAX's share one memory, so the best of all
    is the bound; on an accelerator only JAX's device kernels count.
    """
    import jax
    import jax.numpy as jnp

    n = nbytes // 4
    a, b, c = (np.full(n, value, np.float32) for value in (1.0, 2.0, 3.0))  # touched: no page faults in the timing

    def triad() -> None:
        np.multiply(c, np.float32(3.0), out=a)
        np.add(a, b, out=a)

    host = {
        "numpy copy a=b": _best_rate(lambda: np.copyto(a, b), 2 * n * 4, reps),
        "numpy add a+=b": _best_rate(lambda: np.add(a, b, out=a), 3 * n * 4, reps),
        "numpy triad a=b+s*c": _best_rate(triad, 5 * n * 4, reps),  # two passes: c->a, then a,b->a
    }
    del a, b, c
    x, y = jnp.full(n, 1.0, jnp.float32), jnp.full(n, 2.0, jnp.float32)
    add_donated = jax.jit(lambda u, v: u + v, donate_argnums=0)
    triad_fresh = jax.jit(lambda u, v: u + np.float32(3.0) * v)
    box = {"x": x}

    def jax_add() -> None:
        box["x"] = add_donated(box["x"], y)
        box["x"].block_until_ready()

    device = {
        "jax add x+=y (donated)": _best_rate(jax_add, 3 * n * 4, reps),
        "jax triad x+s*y (new output)": _best_rate(lambda: triad_fresh(box["x"], y).block_until_ready(), 3 * n * 4, reps),
    }
    del box, y
    candidates = dict(device) if device_platform != "cpu" else {**host, **device}
    best = max(candidates, key=lambda name: candidates[name]["best_gb_s"])
    return {"array_bytes": n * 4, "host": host, "device": device, "best_gb_s": candidates[best]["best_gb_s"],
            "best_kernel": best,
            "bound_rule": f"{BYTES_PER_PARAM} bytes per parameter at {candidates[best]['best_gb_s']:.1f} GB/s"}


def _best_rate(fn: Callable[[], Any], nbytes: int, reps: int) -> dict:
    fn()  # warm-up
    times = _times(fn, reps)
    return {"best_gb_s": nbytes / min(times) / 1e9, "median_gb_s": nbytes / statistics.median(times) / 1e9}


# --- the step: server engine vs optax vs the bandwidth bound -----------------


def mixed_sizes(total: int, count: int = 100, seed: int = 0) -> list[int]:
    """`count` tensor sizes spread log-uniformly over three decades, summing to `total`."""
    weights = np.exp(np.random.default_rng(seed).uniform(0, np.log(1000), count))
    sizes = np.maximum(1, np.floor(weights / weights.sum() * total)).astype(np.int64)
    sizes[np.argmax(sizes)] += total - sizes.sum()
    return [int(s) for s in sizes]


def measure_step(param_counts: Sequence[int], reps: int, bandwidth_gb_s: float) -> dict:
    """Median step times of the server's jitted step and optax.adam on the same device tensors."""
    rows = []
    for params in param_counts:
        for layout in ("flat", "mixed"):
            sizes = [params] if layout == "flat" else mixed_sizes(params)
            rows.append(_step_row(params, layout, sizes, reps, bandwidth_gb_s))
            gc.collect()
    targets = []
    for row in rows:
        what = f"{row['params'] / 1e6:g}M {row['layout']} ({row['tensors']} tensors)"
        targets.append(_target("step", f"step {what} vs bandwidth bound", row["server_vs_bound"], "<=", 1.2))
        targets.append(_target("step", f"step {what} vs optax", row["server_vs_optax"], "<=", 1.0))
    return {"rows": rows, "targets": targets}


def _step_row(params: int, layout: str, sizes: Sequence[int], reps: int, bandwidth_gb_s: float) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from optserve.server.engine import adam, parse_config

    rng = np.random.default_rng(1)
    names = [f"t{i:03d}" for i in range(len(sizes))]
    init = {name: rng.standard_normal(size, dtype=np.float32) for name, size in zip(names, sizes)}
    grads = {name: jax.device_put(rng.standard_normal(size, dtype=np.float32) * np.float32(1e-3))
             for name, size in zip(names, sizes)}
    config = parse_config({})
    server_step = adam.make_step(config, names)
    tx = optax.adam(learning_rate=config.learning_rate, b1=config.beta_1, b2=config.beta_2, eps=config.epsilon)

    def optax_update(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    optax_step = jax.jit(optax_update, donate_argnums=(0, 1))
    box = {"state": adam.init(init, config)}
    optax_params = {name: jnp.array(value) for name, value in init.items()}
    box["optax"] = (optax_params, tx.init(optax_params))
    del init

    def run_server() -> None:
        box["state"] = server_step(box["state"], grads)
        jax.block_until_ready(box["state"])

    def run_optax() -> None:
        box["optax"] = optax_step(*box["optax"], grads)
        jax.block_until_ready(box["optax"])

    compile_s = {"server": _time_once(run_server), "optax": _time_once(run_optax)}
    for _ in range(2):
        run_server()
        run_optax()
    server_times, optax_times = [], []
    for _ in range(reps):  # interleaved, so drift on a shared machine hits both alike
        server_times.append(_time_once(run_server))
        optax_times.append(_time_once(run_optax))
    server_s, optax_s = statistics.median(server_times), statistics.median(optax_times)
    bound_s = BYTES_PER_PARAM * params / (bandwidth_gb_s * 1e9)
    return {"params": params, "layout": layout, "tensors": len(sizes),
            "server_ms": server_s * 1e3, "optax_ms": optax_s * 1e3, "bound_ms": bound_s * 1e3,
            "server_vs_bound": server_s / bound_s, "optax_vs_bound": optax_s / bound_s,
            "server_vs_optax": server_s / optax_s,
            "server_gb_s": BYTES_PER_PARAM * params / server_s / 1e9,
            "first_call_s": compile_s, "reps": reps}


# --- transfer: optserve push/pull vs a bare gRPC stream vs raw TCP ------------


def measure_transfer(address: str, metrics: "ServerMetrics", raw_grpc: "RawGrpc", raw_tcp: "RawTcp",
                     sizes_mb: Sequence[int], reps: int, target_mb: int) -> dict:
    """Push and pull MB/s of a single float32 tensor of each size, the three ways interleaved."""
    rows = []
    rng = np.random.default_rng(2)
    with Client(address, timeout=CLIENT_TIMEOUT) as client:
        for size_mb in sizes_mb:
            nbytes = size_mb * MB
            n = nbytes // 4
            grad = {"w": rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)}
            name = f"transfer-{size_mb}"
            opt = client.create_optimizer(name, {"w": np.zeros(n, np.float32)})
            methods: dict[str, Callable[[], float]] = {
                "optserve push": lambda: _time_once(lambda: opt.push(grad)),
                "grpc push": lambda: raw_grpc.push(grad["w"]),
                "tcp push": lambda: raw_tcp.push(grad["w"]),
                "optserve pull": lambda: _time_once(opt.pull),
                "grpc pull": lambda: raw_grpc.pull(nbytes),
                "tcp pull": lambda: raw_tcp.pull(nbytes),
            }
            for fn in methods.values():  # warm-up: compiles the step, allocates the servers' buffers
                fn()
            before = metrics.step_seconds(name)
            times: dict[str, list[float]] = {method: [] for method in methods}
            for _ in range(reps):
                for method, fn in methods.items():
                    times[method].append(fn())
            after = metrics.step_seconds(name)
            client.delete_optimizer(name)
            row: dict[str, Any] = {"mb": size_mb, "bytes": nbytes, "reps": reps,
                                   "server_step_ms": _mean_delta(before, after) * 1e3}
            for method, values in times.items():
                row[method.replace(" ", "_") + "_mb_s"] = nbytes / statistics.median(values) / MB
            for way in ("push", "pull"):
                row[f"{way}_vs_grpc"] = row[f"optserve_{way}_mb_s"] / row[f"grpc_{way}_mb_s"]
                row[f"{way}_vs_tcp"] = row[f"optserve_{way}_mb_s"] / row[f"tcp_{way}_mb_s"]
            rows.append(row)
            del grad
            gc.collect()
    row = next(r for r in rows if r["mb"] == target_mb)
    targets = []
    for way in ("push", "pull"):
        targets.append(_target("transfer", f"{way} {target_mb} MB vs bare gRPC stream", row[f"{way}_vs_grpc"],
                               ">=", 0.9))
        targets.append(_target("transfer", f"{way} {target_mb} MB vs raw TCP", row[f"{way}_vs_tcp"], ">=", 0.7))
    return {"rows": rows, "targets": targets, "target_mb": target_mb, "chunk_bytes": CHUNK_BYTES,
            "note": "optserve push is the whole call, including the server's step (server_step_ms)"}


class RawGrpc:
    """A bare gRPC service of 1 MB `bytes` chunks in a child process, and a client for it.

    Push is client-streaming (the server counts the bytes), Pull server-streaming
    (the server slices chunks off a buffer it holds); no protobuf, no copies
    beyond the one a `bytes` chunk needs.
    """

    def __init__(self):
        import grpc

        self.process, port = _start_child(_serve_raw_grpc)
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=RAW_OPTIONS)
        self._push = self._channel.stream_unary(f"/{RAW_SERVICE}/Push")
        self._pull = self._channel.unary_stream(f"/{RAW_SERVICE}/Pull")

    def push(self, array: np.ndarray) -> float:
        """Seconds to stream the array's bytes in 1 MB chunks and get the count back."""
        view = memoryview(array.reshape(-1).view(np.uint8))
        chunks = (bytes(view[i:i + CHUNK_BYTES]) for i in range(0, len(view), CHUNK_BYTES))
        started = time.perf_counter()
        reply = self._push(chunks, timeout=CLIENT_TIMEOUT)
        elapsed = time.perf_counter() - started
        if int.from_bytes(reply, "little") != len(view):
            raise RuntimeError("bare gRPC push: the server counted a different number of bytes")
        return elapsed

    def pull(self, nbytes: int) -> float:
        """Seconds to receive `nbytes` in 1 MB chunks."""
        started = time.perf_counter()
        received = sum(len(chunk) for chunk in self._pull(nbytes.to_bytes(8, "little"), timeout=CLIENT_TIMEOUT))
        elapsed = time.perf_counter() - started
        if received != nbytes:
            raise RuntimeError(f"bare gRPC pull: {received} of {nbytes} bytes")
        return elapsed

    def close(self) -> None:
        self._channel.close()
        _stop_child(self.process)


class RawTcp:
    """A raw TCP peer over loopback in a child process: receives into, or sends from, a buffer."""

    def __init__(self):
        self.process, port = _start_child(_serve_raw_tcp)
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = np.zeros(0, np.uint8)

    def push(self, array: np.ndarray) -> float:
        """Seconds to send the array's bytes and get the peer's acknowledgement."""
        view = memoryview(array.reshape(-1).view(np.uint8))
        started = time.perf_counter()
        self._sock.sendall(b"P" + len(view).to_bytes(8, "little"))
        self._sock.sendall(view)
        if _recv_exact(self._sock, 1) != b"k":
            raise RuntimeError("raw TCP push: no acknowledgement")
        return time.perf_counter() - started

    def pull(self, nbytes: int) -> float:
        """Seconds to receive `nbytes` into a buffer (allocated and touched beforehand)."""
        if len(self._buffer) < nbytes:
            self._buffer = np.ones(nbytes, np.uint8)
        view = memoryview(self._buffer)[:nbytes]
        started = time.perf_counter()
        self._sock.sendall(b"G" + nbytes.to_bytes(8, "little"))
        _recv_into(self._sock, view)
        return time.perf_counter() - started

    def close(self) -> None:
        self._sock.close()
        _stop_child(self.process)


def _serve_raw_grpc(ports: Any) -> None:
    """Child process: the bare gRPC service (generic handlers, raw bytes in and out)."""
    from concurrent import futures

    import grpc

    held = {"data": np.zeros(0, np.uint8)}

    def push(chunks, context) -> bytes:
        return sum(len(chunk) for chunk in chunks).to_bytes(8, "little")

    def pull(request: bytes, context):
        nbytes = int.from_bytes(request, "little")
        if len(held["data"]) < nbytes:
            held["data"] = np.ones(nbytes, np.uint8)
        view = memoryview(held["data"])[:nbytes]
        for start in range(0, nbytes, CHUNK_BYTES):
            yield bytes(view[start:start + CHUNK_BYTES])

    handler = grpc.method_handlers_generic_handler(RAW_SERVICE, {
        "Push": grpc.stream_unary_rpc_method_handler(push),
        "Pull": grpc.unary_stream_rpc_method_handler(pull),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler], options=RAW_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ports.put(port)
    server.wait_for_termination()


def _serve_raw_tcp(ports: Any) -> None:
    """Child process: one connection at a time; `P`+size receives that many bytes, `G`+size sends them."""
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])
    buffer = np.zeros(0, np.uint8)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                head = _recv_exact(conn, 9)
                if head is None:
                    break
                nbytes = int.from_bytes(head[1:], "little")
                if len(buffer) < nbytes:
                    buffer = np.ones(nbytes, np.uint8)
                view = memoryview(buffer)[:nbytes]
                if head[:1] == b"P":
                    _recv_into(conn, view)
                    conn.sendall(b"k")
                else:
                    conn.sendall(view)


def _recv_exact(sock: socket.socket, nbytes: int) -> bytes | None:
    data = bytearray(nbytes)
    got = 0
    while got < nbytes:
        n = sock.recv_into(memoryview(data)[got:])
        if n == 0:
            return None
        got += n
    return bytes(data)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"raw TCP: connection closed after {got} of {len(view)} bytes")
        got += n


def _start_child(target: Callable[[Any], None]) -> tuple[Any, int]:
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no JAX, no inherited gRPC state
    ports = context.Queue()
    process = context.Process(target=target, args=(ports,), daemon=True)
    process.start()
    return process, ports.get(timeout=120)


def _stop_child(process: Any) -> None:
    process.terminate()
    process.join(10)


# --- round trip: push + step + pull, float32 and bfloat16 wire ---------------


def measure_round_trip(address: str, metrics: "ServerMetrics", raw_tcp: RawTcp, params: int, reps: int,
                       bandwidth_gb_s: float) -> dict:
    """Push then pull of `params` float32 parameters, gradients sent as float32 and as bfloat16.

    compute: the server's step (its `optserve_step_seconds`, mean over the timed
    pushes); serialization: the real client and server codec on the same
    tensors in this process (`_Loopback`); transfer: the rest. A bfloat16
    push is `push(..., wire_dtype="bfloat16")`: it includes the client's rounding.
    """
    rng = np.random.default_rng(3)
    grad32 = rng.standard_normal(params, dtype=np.float32) * np.float32(1e-3)
    init = np.zeros(params, np.float32)
    wires: dict[str, dict] = {"float32": {}, "bfloat16": {"wire_dtype": "bfloat16"}}
    rows = {}
    tcp_push: list[float] = []
    tcp_pull: list[float] = []
    with Client(address, timeout=CLIENT_TIMEOUT) as client:
        opt = client.create_optimizer("round-trip", {"w": init})
        for wire, push_options in wires.items():
            def push(opt=opt, push_options=push_options):
                return opt.push({"w": grad32}, **push_options)

            push()  # compiles the step for this gradient dtype
            opt.pull()
            before = metrics.step_seconds("round-trip")
            push_times, pull_times = [], []
            for _ in range(reps):  # raw TCP interleaved, so drift on a shared machine hits the floor alike
                push_times.append(_time_once(push))
                pull_times.append(_time_once(opt.pull))
                tcp_push.append(raw_tcp.push(init))
                tcp_pull.append(raw_tcp.pull(init.nbytes))
            compute_s = _mean_delta(before, metrics.step_seconds("round-trip"))
            codec_push, codec_pull = _codec_times(init, grad32, push_options, reps)
            push_s, pull_s = statistics.median(push_times), statistics.median(pull_times)
            rows[wire] = {
                "wire": wire, "push_bytes": params * (2 if push_options else 4), "pull_bytes": init.nbytes,
                "push_ms": push_s * 1e3, "pull_ms": pull_s * 1e3, "round_trip_ms": (push_s + pull_s) * 1e3,
                "compute_ms": compute_s * 1e3,
                "serialization_ms": {"push": codec_push * 1e3, "pull": codec_pull * 1e3,
                                     "total": (codec_push + codec_pull) * 1e3},
                "transfer_ms": {"push": (push_s - compute_s - codec_push) * 1e3, "pull": (pull_s - codec_pull) * 1e3,
                                "total": (push_s + pull_s - compute_s - codec_push - codec_pull) * 1e3},
            }
        client.delete_optimizer("round-trip")
    tcp_push, tcp_pull = statistics.median(tcp_push), statistics.median(tcp_pull)
    bound_s = BYTES_PER_PARAM * params / (bandwidth_gb_s * 1e9)
    floor_ms = (tcp_push + tcp_pull + bound_s) * 1e3
    f32, bf16 = rows["float32"], rows["bfloat16"]
    f32["vs_floor"] = f32["round_trip_ms"] / floor_ms
    bf16["vs_floor"] = bf16["round_trip_ms"] / floor_ms
    push_transfer_speedup = f32["transfer_ms"]["push"] / bf16["transfer_ms"]["push"] \
        if bf16["transfer_ms"]["push"] > 0 else float("inf")
    summary = {
        "floor_ms": floor_ms, "floor": {"tcp_push_ms": tcp_push * 1e3, "tcp_pull_ms": tcp_pull * 1e3,
                                        "step_bound_ms": bound_s * 1e3},
        "bfloat16_push_transfer_speedup": push_transfer_speedup,
        "bfloat16_round_trip_speedup": f32["round_trip_ms"] / bf16["round_trip_ms"],
    }
    targets = [
        _target("round_trip", f"round trip {params / 1e6:g}M float32 vs physical floor", f32["vs_floor"], "<=", 1.5),
        _target("round_trip", "bfloat16 vs float32 wire, push transfer speedup", push_transfer_speedup, ">=", 1.6),
    ]
    return {"params": params, "reps": reps, "rows": rows, **summary, "targets": targets,
            "note": "transfer = measured time - compute - (de)serialization; the pull always carries float32 "
                    "weights, so the wire dtype changes the push only"}


def _codec_times(init: np.ndarray, grad: np.ndarray, push_options: dict, reps: int) -> tuple[float, float]:
    """Median seconds of one push's and one pull's encoding and decoding, both sides, without transport."""
    from optserve.client.client import Optimizer

    loopback = _Loopback({"w": init})
    client = Client.__new__(Client)  # the real client code on calls that stand in for the channel
    client.address, client.timeout, client.chunk_bytes = "in-process", CLIENT_TIMEOUT, CHUNK_BYTES
    client._push, client._pull = loopback.push, loopback.pull
    opt = Optimizer(client, "round-trip")
    opt.push({"w": grad}, **push_options)
    opt.pull()
    push = statistics.median(_times(lambda: opt.push({"w": grad}, **push_options), reps))
    pull = statistics.median(_times(opt.pull, reps))
    return push, pull


class _Loopback:
    """Stands in for the push and pull calls: each message goes through the serializers gRPC would
    use, then the server's codec decodes the push into a reused buffer (and checks it for NaN/Inf, as
    the default policy does) or encodes the pull from a host copy of device weights, as the server does."""

    def __init__(self, params: dict[str, np.ndarray]):
        import jax

        from optserve.client.wire import aligned_empty, stream_message_parser
        from optserve.server import codec
        from optserve.v1 import optserve_pb2 as pb

        self._codec = codec
        self._shapes = {name: tuple(value.shape) for name, value in params.items()}
        self._weights = {name: jax.device_put(value) for name, value in params.items()}
        self._buffers: dict[int, np.ndarray] = {}
        self._aligned_empty = aligned_empty
        self._parse_push = stream_message_parser(pb.PushGradientsRequest)
        self._parse_pull = stream_message_parser(pb.PullWeightsResponse)
        self._reply = pb.PushGradientsResponse(version=1, iterations=1)

    def _buffer(self, nbytes: int) -> np.ndarray:
        if nbytes not in self._buffers:
            self._buffers[nbytes] = self._aligned_empty(nbytes)
            self._buffers[nbytes].fill(0)
        return self._buffers[nbytes]

    def push(self, requests, timeout=None, wait_for_ready=None):
        header, chunks = self._codec.split_push(self._parse_push(bytes(message)) for message in requests)
        grads = self._codec.decode_gradients(header, chunks, self._shapes, 1 << 62, into=self._buffer)
        for grad in grads.values():
            values = grad[1] if isinstance(grad, tuple) else grad
            with np.errstate(invalid="ignore"):
                if not np.isfinite(values).all():
                    raise ValueError("non-finite gradient")
        return self._reply

    def pull(self, request, timeout=None, wait_for_ready=None):
        arrays = [(name, np.array(self._weights[name])) for name in self._shapes]
        for message in self._codec.encode_pull(1, 1, arrays):
            yield self._parse_pull(message)


# --- chunk size ----------------------------------------------------------------


def measure_chunk_sizes(address: str, size_mb: int, chunk_kib: Sequence[int], reps: int) -> dict:
    """The same push with clients that cut the stream into chunks of different sizes (interleaved)."""
    n = size_mb * MB // 4
    grad = {"w": np.random.default_rng(4).standard_normal(n, dtype=np.float32) * np.float32(1e-3)}
    clients = {kib: Client(address, timeout=CLIENT_TIMEOUT, chunk_bytes=kib * 1024) for kib in chunk_kib}
    try:
        creator = clients[chunk_kib[0]]
        creator.create_optimizer("chunk-size", {"w": np.zeros(n, np.float32)})
        handles = {kib: client.optimizer("chunk-size") for kib, client in clients.items()}
        for handle in handles.values():
            handle.push(grad)  # warm-up
        times: dict[int, list[float]] = {kib: [] for kib in chunk_kib}
        for _ in range(reps):
            for kib, handle in handles.items():
                times[kib].append(_time_once(lambda handle=handle: handle.push(grad)))
        creator.delete_optimizer("chunk-size")
    finally:
        for client in clients.values():
            client.close()
    rows = [{"chunk_kib": kib, "push_ms": statistics.median(t) * 1e3,
             "mb_s": size_mb * MB / statistics.median(t) / 1e6} for kib, t in times.items()]
    return {"size_mb": size_mb, "rows": rows, "best_chunk_kib": min(rows, key=lambda r: r["push_ms"])["chunk_kib"]}


# --- concurrent workers ------------------------------------------------------


def measure_workers(address: str, counts: Sequence[int], params: int, seconds: float) -> dict:
    """Worker processes pushing float32 gradients to one async optimizer for `seconds`, all at once."""
    context = multiprocessing.get_context("spawn")
    push_bytes = params * 4
    rows = []
    with Client(address, timeout=CLIENT_TIMEOUT) as client:
        opt = client.create_optimizer("workers", {"w": np.zeros(params, np.float32)})
        opt.push({"w": np.zeros(params, np.float32)})  # compiles the step
        for count in counts:
            barrier, results = context.Barrier(count + 1), context.Queue()
            procs = [context.Process(target=_push_worker, args=(address, "workers", params, seconds, w, barrier,
                                                                 results), daemon=True)
                     for w in range(count)]
            for proc in procs:
                proc.start()
            barrier.wait(timeout=300)
            reports = [results.get(timeout=300 + seconds) for _ in procs]
            for proc in procs:
                proc.join(60)
            pushes = sum(r["pushes"] for r in reports)
            wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
            rows.append({"workers": count, "pushes": pushes, "seconds": wall, "steps_per_s": pushes / wall,
                         "mb_per_s": pushes * push_bytes / wall / MB,
                         "median_push_ms": statistics.median(r["median_push_ms"] for r in reports)})
        client.delete_optimizer("workers")
    one, most = rows[0], rows[-1]
    targets = [_target("workers", f"{most['workers']} workers aggregate vs {one['workers']}",
                       most["steps_per_s"] / one["steps_per_s"], ">=", 1.0)]
    return {"params": params, "push_bytes": push_bytes, "rows": rows, "targets": targets}


def _push_worker(address: str, name: str, params: int, seconds: float, worker: int, barrier: Any,
                 results: Any) -> None:
    """Worker process: one warm-up push, then pushes for `seconds` after every worker is ready."""
    with Client(address, timeout=CLIENT_TIMEOUT) as client:
        opt = client.optimizer(name)
        grads = {"w": np.random.default_rng(100 + worker).standard_normal(params, dtype=np.float32) * np.float32(1e-3)}
        opt.push(grads)
        barrier.wait(timeout=300)
        start = time.time()
        latencies = []
        while time.time() - start < seconds:
            latencies.append(_time_once(lambda: opt.push(grads)))
        results.put({"pushes": len(latencies), "start": start, "end": time.time(),
                     "median_push_ms": statistics.median(latencies) * 1e3})


# --- memory ------------------------------------------------------------------


def measure_memory(peak_params: int, growth_params: int, growth_pushes: int) -> dict:
    """Peak RSS of a fresh server holding `peak_params`, then its RSS over `growth_pushes` small pushes."""
    import psutil

    rng = np.random.default_rng(4)
    with ServerProcess(log=io.StringIO()) as server:
        proc = psutil.Process(server.process.pid)
        sampler = _RssSampler(proc)
        idle = proc.memory_info().rss
        with Client(server.address, timeout=CLIENT_TIMEOUT) as client:
            grads = {"w": rng.standard_normal(peak_params, dtype=np.float32) * np.float32(1e-3)}
            opt = client.create_optimizer("peak", {"w": np.zeros(peak_params, np.float32)})
            for _ in range(3):
                opt.push(grads)
                opt.pull()
            held = proc.memory_info().rss
            peak = max(sampler.stop(), _high_water_mark(proc.pid) or 0)
            state = STATE_BYTES_PER_PARAM * peak_params
            client.delete_optimizer("peak")
            del grads
            grads = {"w": rng.standard_normal(growth_params, dtype=np.float32) * np.float32(1e-3)}
            opt = client.create_optimizer("growth", {"w": np.zeros(growth_params, np.float32)})
            warmup = max(20, growth_pushes // 10)
            every = max(1, growth_pushes // 100)
            samples = []
            for i in range(1, growth_pushes + 1):
                opt.push(grads)
                if i % every == 0 or i == warmup:
                    samples.append((i, proc.memory_info().rss))
            client.delete_optimizer("growth")
    after_warmup = dict(samples)[warmup]
    last = samples[-1][1]
    tail = [(i, rss) for i, rss in samples if i >= warmup]
    slope = float(np.polyfit([i for i, _ in tail], [rss for _, rss in tail], 1)[0]) if len(tail) > 2 else 0.0
    limit = 1.5 * state + 300 * MB
    targets = [
        _target("memory", f"peak RSS vs 1.5 x state ({state / MB:.0f} MB) + 300 MB", peak / limit, "<=", 1.0),
        _target("memory", f"RSS growth over pushes {warmup}..{growth_pushes} (MB, limit {RSS_GROWTH_LIMIT / MB:g})",
                (last - after_warmup) / MB, "<=", RSS_GROWTH_LIMIT / MB, unit=" MB"),
    ]
    return {
        "peak": {"params": peak_params, "state_bytes": state, "idle_rss": idle, "rss_holding_state": held,
                 "peak_rss": peak, "limit_bytes": limit, "peak_vs_state": peak / state},
        "growth": {"params": growth_params, "push_bytes": growth_params * 4, "pushes": growth_pushes,
                   "warmup_pushes": warmup, "rss_after_warmup": after_warmup, "rss_last": last,
                   "growth_bytes": last - after_warmup, "slope_bytes_per_push": slope,
                   "samples": [{"push": i, "rss": rss} for i, rss in samples]},
        "targets": targets,
    }


class _RssSampler:
    """Samples a process's RSS every 10 ms on a thread; `stop` returns the largest sample."""

    def __init__(self, proc: Any):
        self._proc, self._peak, self._done = proc, proc.memory_info().rss, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.01):
            try:
                self._peak = max(self._peak, self._proc.memory_info().rss)
            except Exception:  # the process ended
                return

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self._peak


def _high_water_mark(pid: int) -> int | None:
    """VmHWM (peak RSS) from /proc on Linux; None elsewhere."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --- durability --------------------------------------------------------------


def measure_durability(params: int, pushes: int) -> dict:
    """Median push of `params` float32 gradients to a server per durability mode (memory, wal, none)."""
    rng = np.random.default_rng(0)
    init = {"w": rng.normal(size=params).astype(np.float32)}
    grad = {"w": rng.normal(size=params).astype(np.float32)}
    rows = {}
    for mode, args in DURABILITY_MODES.items():
        with tempfile.TemporaryDirectory() as data_dir:
            extra = ["--data-dir", data_dir, "--checkpoint-every", str(10 * pushes), *args] if args else []
            with ServerProcess(extra, log=io.StringIO()) as server:
                client = Client(server.address, timeout=CLIENT_TIMEOUT)
                opt = client.create_optimizer("bench", init, {"learning_rate": 1e-3})
                opt.push(grad)  # compiles the step
                times = _times(lambda: opt.push(grad), pushes)
                client.close()
        push_s = statistics.median(times)
        rows[mode] = {"push_ms": push_s * 1e3, "mb_per_s": params * 4 / push_s / 1e6}
    return rows


# --- the server's own step latency -------------------------------------------


class ServerMetrics:
    """Reads a server's Prometheus `optserve_step_seconds` (it must run with `--metrics-port 0`)."""

    def __init__(self, server: ServerProcess, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            match = next((m for m in map(re.compile(r"metrics on http://([^:\s]+):(\d+)/metrics").search,
                                         list(server.lines)) if m), None)
            if match:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not report its metrics port:\n" + "".join(server.lines[-20:]))
            time.sleep(0.05)
        host = match.group(1) if match.group(1) not in ("0.0.0.0", "::") else "127.0.0.1"
        self.url = f"http://{host}:{match.group(2)}/metrics"

    def step_seconds(self, optimizer: str) -> tuple[float, float]:
        """(sum of step seconds, number of steps) of one optimizer so far."""
        with urllib.request.urlopen(self.url, timeout=30) as reply:
            text = reply.read().decode()
        values = []
        for suffix in ("sum", "count"):
            match = re.search(rf'^optserve_step_seconds_{suffix}\{{optimizer="{re.escape(optimizer)}"\}} (\S+)$',
                              text, re.MULTILINE)
            values.append(float(match.group(1)) if match else 0.0)
        return values[0], values[1]


def _server_device(server: ServerProcess) -> str:
    """The JAX device the server reported in its "listening on" log line."""
    match = next((m for m in map(re.compile(r"JAX device: (.+)\)\s*$").search, server.lines) if m), None)
    return match.group(1) if match else "unknown"


def _mean_delta(before: tuple[float, float], after: tuple[float, float]) -> float:
    steps = after[1] - before[1]
    return (after[0] - before[0]) / steps if steps else float("nan")


# --- helpers: timing, targets, tables ----------------------------------------


def _time_once(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _times(fn: Callable[[], Any], reps: int) -> list[float]:
    return [_time_once(fn) for _ in range(reps)]


def _target(section: str, name: str, value: float, op: str, limit: float, unit: str = "x") -> dict:
    met = value <= limit if op == "<=" else value >= limit
    return {"section": section, "name": name, "value": value, "op": op, "limit": limit, "unit": unit,
            "met": bool(met)}


def _target_text(target: dict) -> str:
    unit = target["unit"]
    return (f"{'met' if target['met'] else 'NOT MET'}: {target['value']:.3g}{unit} "
            f"(target {target['op']} {target['limit']:g}{unit})")


def _print_table(title: str, headers: list[str], rows: list[list[str]], target: bool = True) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    print(f"\n== {title} ==")
    for line in [headers, *rows]:
        cells = []
        for i, cell in enumerate(line):
            left = i == 0 or (target and i == len(line) - 1)
            cells.append(str(cell).ljust(widths[i]) if left else str(cell).rjust(widths[i]))
        print("  ".join(cells).rstrip(), flush=True)


def _print_bandwidth(bw: dict) -> None:
    rows = [[name, f"{r['best_gb_s']:.1f}", f"{r['median_gb_s']:.1f}"]
            for group in ("host", "device") for name, r in bw[group].items()]
    _print_table(f"memory bandwidth, {bw['array_bytes'] / MB:.0f} MB arrays (GB/s)", ["kernel", "best", "median"],
                 rows, target=False)
    print(f"bound: {bw['bound_rule']} (best kernel: {bw['best_kernel']})")


def _print_step(step: dict) -> None:
    rows = []
    targets = iter(step["targets"])
    for r in step["rows"]:
        bound_t, optax_t = next(targets), next(targets)
        rows.append([f"{r['params'] / 1e6:g}M", r["layout"], str(r["tensors"]), f"{r['server_ms']:.2f}",
                     f"{r['optax_ms']:.2f}", f"{r['bound_ms']:.2f}", f"{r['server_gb_s']:.1f}",
                     f"{r['server_vs_bound']:.2f}x", f"{r['server_vs_optax']:.2f}x",
                     f"bound {_target_text(bound_t)}; optax {_target_text(optax_t)}"])
    _print_table("Adam step (median ms): server engine vs optax.adam vs bandwidth bound",
                 ["params", "layout", "tensors", "server", "optax", "bound", "server GB/s", "vs bound", "vs optax",
                  "target"], rows)


def _print_transfer(transfer: dict) -> None:
    rows = []
    for r in transfer["rows"]:
        for way in ("push", "pull"):
            mark = ""
            if r["mb"] == transfer["target_mb"]:
                grpc_t, tcp_t = [t for t in transfer["targets"] if t["name"].startswith(way)]
                mark = f"vs gRPC {_target_text(grpc_t)}; vs TCP {_target_text(tcp_t)}"
            rows.append([f"{r['mb']} MB", way, f"{r[f'optserve_{way}_mb_s']:.0f}", f"{r[f'grpc_{way}_mb_s']:.0f}",
                         f"{r[f'tcp_{way}_mb_s']:.0f}", f"{r[f'{way}_vs_grpc']:.2f}x", f"{r[f'{way}_vs_tcp']:.2f}x",
                         f"{r['server_step_ms']:.1f}" if way == "push" else "", mark])
    _print_table("push / pull throughput (MB/s, medians): optserve vs bare 1 MB-chunk gRPC vs raw TCP",
                 ["size", "way", "optserve", "bare gRPC", "raw TCP", "vs gRPC", "vs TCP", "step ms in push",
                  "target"], rows)


def _print_round_trip(rt: dict) -> None:
    rows = []
    floor_t, bf16_t = rt["targets"]
    for wire, r in rt["rows"].items():
        rows.append([wire, f"{r['push_bytes'] / MB:.0f}", f"{r['push_ms']:.1f}", f"{r['pull_ms']:.1f}",
                     f"{r['round_trip_ms']:.1f}", f"{r['compute_ms']:.1f}",
                     f"{r['serialization_ms']['push']:.1f}+{r['serialization_ms']['pull']:.1f}",
                     f"{r['transfer_ms']['push']:.1f}+{r['transfer_ms']['pull']:.1f}", f"{r['vs_floor']:.2f}x",
                     f"floor {_target_text(floor_t)}" if wire == "float32" else f"push transfer speedup "
                                                                                 f"{_target_text(bf16_t)}"])
    _print_table(f"round trip, {rt['params'] / 1e6:g}M params (ms, medians): push + step + pull",
                 ["wire", "push MB", "push", "pull", "round trip", "compute", "(de)ser push+pull",
                  "transfer push+pull", "vs floor", "target"], rows)
    f = rt["floor"]
    print(f"physical floor {rt['floor_ms']:.1f} ms = raw TCP push {f['tcp_push_ms']:.1f} + raw TCP pull "
          f"{f['tcp_pull_ms']:.1f} + step bound {f['step_bound_ms']:.1f}; bfloat16 round trip "
          f"{rt['bfloat16_round_trip_speedup']:.2f}x faster than float32")


def _print_workers(workers: dict) -> None:
    rows = []
    for r in workers["rows"]:
        mark = _target_text(workers["targets"][0]) if r is workers["rows"][-1] else ""
        rows.append([str(r["workers"]), str(r["pushes"]), f"{r['seconds']:.1f}", f"{r['steps_per_s']:.1f}",
                     f"{r['mb_per_s']:.0f}", f"{r['median_push_ms']:.1f}", mark])
    _print_table(f"concurrent workers pushing {workers['push_bytes'] / MB:.0f} MB each (aggregate)",
                 ["workers", "pushes", "seconds", "steps/s", "MB/s", "median push ms", "target"], rows)


def _print_memory(memory: dict) -> None:
    p, g = memory["peak"], memory["growth"]
    peak_t, growth_t = memory["targets"]
    rows = [
        ["peak RSS", f"{p['params'] / 1e6:g}M params, state {p['state_bytes'] / MB:.0f} MB, idle "
                     f"{p['idle_rss'] / MB:.0f} MB, holding {p['rss_holding_state'] / MB:.0f} MB",
         f"{p['peak_rss'] / MB:.0f} MB", f"{p['peak_vs_state']:.2f}x state", _target_text(peak_t)],
        ["RSS growth", f"{g['pushes']} pushes of {g['push_bytes'] / MB:.0f} MB, after push {g['warmup_pushes']}: "
                       f"{g['rss_after_warmup'] / MB:.0f} MB -> {g['rss_last'] / MB:.0f} MB",
         f"{g['growth_bytes'] / MB:+.1f} MB", f"{g['slope_bytes_per_push'] / 1e3:+.1f} KB/push",
         _target_text(growth_t)],
    ]
    _print_table("server memory (RSS)", ["what", "setup", "value", "ratio", "target"], rows)


def _print_durability(durability: dict, plan: Plan) -> None:
    base = durability["memory"]["push_ms"]
    rows = [[mode, f"{r['push_ms']:.2f}", f"{r['mb_per_s']:.0f}", f"{r['push_ms'] / base:.2f}x", "-"]
            for mode, r in durability.items()]
    _print_table(f"durability: {plan.durability_pushes} pushes of {plan.durability_params:,} float32 gradients "
                 f"({plan.durability_params * 4 / MB:.0f} MB), median", ["mode", "push ms", "MB/s", "vs memory",
                                                                         "target"], rows)


# --- the plot ----------------------------------------------------------------


def write_plot(results: dict, path: str) -> None:
    """One PNG with a panel per section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    fig.suptitle(f"optserve bench on {results['environment']['device']} "
                 f"({'quick' if results['quick'] else 'full'} run, {results['elapsed_s']:.0f} s)")

    ax = axes[0, 0]
    rows = results["step"]["rows"]
    x = np.arange(len(rows))
    for i, (key, label) in enumerate([("server_ms", "server engine"), ("optax_ms", "optax.adam"),
                                      ("bound_ms", "bandwidth bound")]):
        ax.bar(x + (i - 1) * 0.27, [r[key] for r in rows], 0.27, label=label)
    ax.set_xticks(x, [f"{r['params'] / 1e6:g}M\n{r['layout']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("ms per step (median)")
    ax.set_title("Adam step")
    ax.legend()

    ax = axes[0, 1]
    rows = results["transfer"]["rows"]
    x = np.arange(len(rows))
    series = [(f"{who}_{way}_mb_s", f"{label} {way}") for way in ("push", "pull")
              for who, label in (("optserve", "optserve"), ("grpc", "bare gRPC"), ("tcp", "raw TCP"))]
    for i, (key, label) in enumerate(series):
        ax.bar(x + (i - 2.5) * 0.14, [r[key] for r in rows], 0.14, label=label)
    ax.set_xticks(x, [f"{r['mb']} MB" for r in rows])
    ax.set_ylabel("MB/s (median)")
    ax.set_title("push / pull throughput")
    ax.legend(fontsize=7)

    ax = axes[0, 2]
    rt = results["round_trip"]
    wires = list(rt["rows"])
    bottom = np.zeros(len(wires))
    parts = [("compute", lambda r: r["compute_ms"]), ("(de)serialization", lambda r: r["serialization_ms"]["total"]),
             ("transfer", lambda r: r["transfer_ms"]["total"])]
    for label, get in parts:
        values = np.array([max(get(rt["rows"][w]), 0.0) for w in wires])
        ax.bar(wires, values, bottom=bottom, label=label)
        bottom += values
    ax.axhline(rt["floor_ms"], color="black", linestyle="--", label="physical floor (float32)")
    ax.set_ylim(0, max(bottom.max(), rt["floor_ms"]) * 1.4)
    ax.set_ylabel("ms (medians; transfer = the rest)")
    ax.set_title(f"round trip, {rt['params'] / 1e6:g}M params")
    ax.legend()

    ax = axes[1, 0]
    rows = results["workers"]["rows"]
    labels = [str(r["workers"]) for r in rows]
    bars = ax.bar(labels, [r["steps_per_s"] for r in rows])
    ax.bar_label(bars, [f"{r['mb_per_s']:.0f} MB/s" for r in rows])
    ax.set_xlabel("concurrent worker processes")
    ax.set_ylabel("aggregate steps/s")
    ax.set_title(f"concurrent pushes of {results['workers']['push_bytes'] / MB:.0f} MB")

    ax = axes[1, 1]
    g = results["memory"]["growth"]
    ax.plot([s["push"] for s in g["samples"]], [s["rss"] / MB for s in g["samples"]], ".-")
    ax.axvline(g["warmup_pushes"], color="gray", linestyle=":", label="end of warm-up")
    ax.set_xlabel("push")
    ax.set_ylabel("server RSS (MB)")
    p = results["memory"]["peak"]
    ax.set_title(f"RSS over pushes; peak {p['peak_rss'] / MB:.0f} MB holding {p['state_bytes'] / MB:.0f} MB state")
    ax.legend()

    ax = axes[1, 2]
    durability = results["durability"]
    ax.bar(list(durability), [r["push_ms"] for r in durability.values()])
    ax.set_ylabel("push ms (median)")
    ax.set_title(f"durability, {results['plan']['durability_params'] * 4 / MB:.0f} MB pushes")

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- setup ---------------------------------------------------------------------


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not on this platform
        return "n/a"


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _quiet_gpu_preallocation() -> None:
    """The bench process and its servers share one accelerator: none may take 75% of it up front."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
