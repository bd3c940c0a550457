"""Compute sections: the environment, the memory bandwidth bound, and the Adam step against optax."""

import gc
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from optserve.server.bench.common import BYTES_PER_PARAM, make_target, time_once, time_reps

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
        "load_average_at_start": load_average(),  # other work on the machine skews every figure
    }


def load_average() -> str:
    """The 1, 5 and 15 minute load averages as text ("n/a" where the platform has none): other work skews figures."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not on this platform
        return "n/a"


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

    def jax_triad() -> None:
        triad_fresh(box["x"], y).block_until_ready()

    device = {
        "jax add x+=y (donated)": _best_rate(jax_add, 3 * n * 4, reps),
        "jax triad x+s*y (new output)": _best_rate(jax_triad, 3 * n * 4, reps),
    }
    del box, y
    candidates = dict(device) if device_platform != "cpu" else {**host, **device}
    best = max(candidates, key=lambda name: candidates[name]["best_gb_s"])
    return {"array_bytes": n * 4, "host": host, "device": device, "best_gb_s": candidates[best]["best_gb_s"],
            "best_kernel": best,
            "bound_rule": f"{BYTES_PER_PARAM} bytes per parameter at {candidates[best]['best_gb_s']:.1f} GB/s"}


def _best_rate(fn: Callable[[], Any], nbytes: int, reps: int) -> dict:
    fn()  # warm-up
    times = time_reps(fn, reps)
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
        limit = 1.2 if row["layout"] == "flat" else 1.3  # the targets: 1.2x on one tensor, 1.3x on 100
        targets.append(make_target("step", f"step {what} vs bandwidth bound", row["server_vs_bound"], "<=", limit))
        targets.append(make_target("step", f"step {what} vs optax", row["server_vs_optax"], "<=", 1.0))
    return {"rows": rows, "targets": targets}


def _step_row(params: int, layout: str, sizes: Sequence[int], reps: int, bandwidth_gb_s: float) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from optserve.server.engine import parse_config, pipeline

    rng = np.random.default_rng(1)
    names = [f"t{i:03d}" for i in range(len(sizes))]
    init = {name: rng.standard_normal(size, dtype=np.float32) for name, size in zip(names, sizes)}
    host_grads = {name: rng.standard_normal(size, dtype=np.float32) * np.float32(1e-3)
                  for name, size in zip(names, sizes)}
    grads = {name: jax.device_put(value) for name, value in host_grads.items()}  # optax's
    config = parse_config({})
    server_step = pipeline.make_step(config, names)
    tx = optax.adam(learning_rate=config.learning_rate, b1=config.beta_1, b2=config.beta_2, eps=config.epsilon)

    def optax_update(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    optax_step = jax.jit(optax_update, donate_argnums=(0, 1))
    box = {"state": pipeline.init(init, config)}
    flat_grads = pipeline.flat_grads(pipeline.layout_of(box["state"]), host_grads)  # laid out as a push arrives
    del host_grads
    optax_params = {name: jnp.array(value) for name, value in init.items()}
    box["optax"] = (optax_params, tx.init(optax_params))
    del init

    def run_server() -> None:
        box["state"] = server_step(box["state"], flat_grads)
        jax.block_until_ready(box["state"])

    def run_optax() -> None:
        box["optax"] = optax_step(*box["optax"], grads)
        jax.block_until_ready(box["optax"])

    compile_s = {"server": time_once(run_server), "optax": time_once(run_optax)}
    for _ in range(2):
        run_server()
        run_optax()
    server_times, optax_times = [], []
    for _ in range(reps):  # interleaved, so drift on a shared machine hits both alike
        server_times.append(time_once(run_server))
        optax_times.append(time_once(run_optax))
    server_s, optax_s = statistics.median(server_times), statistics.median(optax_times)
    bound_s = BYTES_PER_PARAM * params / (bandwidth_gb_s * 1e9)
    return {"params": params, "layout": layout, "tensors": len(sizes),
            "server_ms": server_s * 1e3, "optax_ms": optax_s * 1e3, "bound_ms": bound_s * 1e3,
            "server_vs_bound": server_s / bound_s, "optax_vs_bound": optax_s / bound_s,
            "server_vs_optax": server_s / optax_s,
            "server_gb_s": BYTES_PER_PARAM * params / server_s / 1e9,
            "first_call_s": compile_s, "reps": reps}
