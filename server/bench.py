"""`optserve bench`: measurements taken side by side in one run, reported as a table and JSON.

Today it measures what each durability mode costs a push: the same pushes to
a server process that keeps its state in memory, one with `--durability wal`
(a log record written and fsynced per push) and one with `--durability none`
(checkpoints only). Medians of repeated pushes; ratios are against the
in-memory server of the same run, since absolute figures drift between runs
on a shared machine.
"""

import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from optserve.client import Client
from optserve.server.launch import ServerProcess

DURABILITY_MODES = {
    "memory": [],
    "wal": ["--durability", "wal"],
    "none": ["--durability", "none"],
}


def run_bench(quick: bool = False, json_path: str | None = None) -> int:
    """Runs every measurement, prints the table, writes the JSON; returns an exit status."""
    params = 1_000_000 if quick else 10_000_000
    pushes = 10 if quick else 30
    print(f"durability: {pushes} pushes of {params:,} float32 gradients ({params * 4 / 1e6:.0f} MB) each")
    results = {"durability": _durability(params, pushes)}
    base = results["durability"]["memory"]["push_ms"]
    print(f"{'mode':8} {'push ms (median)':>17} {'MB/s':>8} {'vs memory':>10}")
    for mode, row in results["durability"].items():
        print(f"{mode:8} {row['push_ms']:17.2f} {row['mb_per_s']:8.0f} {row['push_ms'] / base:9.2f}x")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
        print(f"wrote {json_path}")
    return 0


def _durability(params: int, pushes: int) -> dict:
    rng = np.random.default_rng(0)
    init = {"w": rng.normal(size=params).astype(np.float32)}
    grad = {"w": rng.normal(size=params).astype(np.float32)}
    rows = {}
    for mode, args in DURABILITY_MODES.items():
        with tempfile.TemporaryDirectory() as data_dir:
            extra = ["--data-dir", data_dir, "--checkpoint-every", str(10 * pushes), *args] if args else []
            with ServerProcess(extra, log=io.StringIO()) as server:
                client = Client(server.address, timeout=120)
                opt = client.create_optimizer("bench", init, {"learning_rate": 1e-3})
                opt.push(grad)  # compiles the step
                times = []
                for _ in range(pushes):
                    started = time.perf_counter()
                    opt.push(grad)
                    times.append(time.perf_counter() - started)
                client.close()
        push_s = statistics.median(times)
        rows[mode] = {"push_ms": push_s * 1e3, "mb_per_s": params * 4 / push_s / 1e6}
    return rows
