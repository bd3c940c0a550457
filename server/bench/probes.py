"""Two one-off measurements behind limits in the README, outside `optserve bench`'s report.

`python -m optserve.server.bench.probes checked-step` times the in-place Adam step
against the checked step that non_finite_policy "refuse" falls back to (10M
parameters, median of 15). `python -m optserve.server.bench.probes compile N`
times the first step over N one-element tensors in this process and prints its
peak RSS: run it in a fresh process per N.
"""

import resource
import statistics
import sys
import time

import jax
import numpy as np

from optserve.server.engine import pipeline
from optserve.server.engine.config import parse_config


def checked_step_ratio(size: int = 10_000_000, reps: int = 15) -> dict:
    """Median seconds of the in-place step and of the checked step, and their ratio."""
    config = parse_config({})
    params = {"w": np.ones(size, np.float32)}
    plain, checked = pipeline.make_step(config, ["w"]), pipeline.make_checked_step(config, ["w"])
    state = pipeline.init(params, config)
    grads = pipeline.flat_grads(pipeline.layout_of(state), {"w": np.full(size, 0.5, np.float32)})
    times = {"in_place": [], "checked": []}
    for _ in range(reps + 1):  # the first of each compiles
        started = time.perf_counter()
        state = jax.block_until_ready(plain(state, grads))
        times["in_place"].append(time.perf_counter() - started)
        started = time.perf_counter()
        new, finite = checked(state, grads)
        jax.block_until_ready((new, finite))
        times["checked"].append(time.perf_counter() - started)
        state = new
    medians = {kind: statistics.median(values[1:]) for kind, values in times.items()}
    return {**medians, "ratio": medians["checked"] / medians["in_place"]}


def first_step_cost(tensors: int) -> dict:
    """Seconds of the first (compiling) step over `tensors` one-element tensors, and the process's peak RSS."""
    config = parse_config({})
    names = [f"t{i}" for i in range(tensors)]
    state = pipeline.init({name: np.ones(1, np.float32) for name in names}, config)
    step = pipeline.make_step(config, names)
    grads = pipeline.flat_grads(pipeline.layout_of(state), {name: np.ones(1, np.float32) for name in names})
    started = time.perf_counter()
    jax.block_until_ready(step(state, grads))
    return {"tensors": tensors, "seconds": time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


if __name__ == "__main__":
    if sys.argv[1:2] == ["checked-step"]:
        print(checked_step_ratio())
    elif sys.argv[1:2] == ["compile"] and len(sys.argv) == 3:
        print(first_step_cost(int(sys.argv[2])))
    else:
        sys.exit(__doc__)
