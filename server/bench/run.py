"""The run: the sizes of a quick and a full run, and `run_bench`, which runs every section in order."""

import gc
import io
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from optserve.server.bench.common import MB
from optserve.server.bench.compute import load_average, measure_bandwidth, measure_environment, measure_step
from optserve.server.bench.peers import RawGrpc, RawTcp
from optserve.server.bench.scaleout import measure_scale_out
from optserve.server.bench.report import (
    print_bandwidth,
    print_durability,
    print_memory,
    print_round_trip,
    print_scale_out,
    print_server_model,
    print_step,
    print_table,
    print_transfer,
    print_versus,
    print_workers,
    target_text,
    write_plot,
)
from optserve.server.bench.server_stats import ServerMetrics, measure_durability, measure_memory, server_device
from optserve.server.bench.transfer import (
    measure_chunk_sizes,
    measure_round_trip,
    measure_server_model,
    measure_transfer,
    measure_workers,
)
from optserve.server.bench.versus import measure_versus
from optserve.server.launch import ServerProcess


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
    sync_rounds: int  # rounds each worker pushes in the sync rows of the workers section
    peak_params: int
    growth_params: int
    growth_pushes: int
    durability_params: int
    durability_pushes: int
    versus_params: int  # parameters of a round trip in "optserve vs peers"
    versus_reps: int
    versus_worker_seconds: float
    peers: bool  # run PyTorch RPC and Ray in "optserve vs peers" (--peers / --no-peers override)
    chunk_kib: tuple[int, ...] = (256, 512, 1024, 2048, 3584)  # client chunk sizes compared
    chunk_mb: int = 40  # push size of the chunk-size comparison
    scale_out_shards: tuple[int, ...] = (1, 2, 3)  # shard counts of the scale-out section
    scale_out_workers: int = 3
    scale_out_params: int = 2_000_000  # parameters of the model each worker pushes whole (over the shards)
    scale_out_tensors: int = 24
    scale_out_seconds: float = 8.0  # each worker's pushing time per shard count
    scale_out_rate_mbit: float = 200.0  # every link's rate, each way (README: why not 1 Gbit/s on 2 cores)


QUICK = Plan(bandwidth_bytes=128 * MB, bandwidth_reps=3, step_params=(1_000_000,), step_reps=5,
             transfer_mb=(4, 16), transfer_target_mb=16, transfer_reps=5,
             round_trip_params=1_000_000, round_trip_reps=5,
             worker_counts=(1, 2, 4), worker_params=1_000_000, worker_seconds=1.0, sync_rounds=10,
             peak_params=1_000_000, growth_params=1_000_000, growth_pushes=200,
             durability_params=1_000_000, durability_pushes=10, versus_params=1_000_000, versus_reps=3,
             versus_worker_seconds=1.0, peers=False, chunk_kib=(256, 1024, 3584), chunk_mb=16,
             scale_out_params=500_000, scale_out_seconds=1.5)
FULL = Plan(bandwidth_bytes=256 * MB, bandwidth_reps=7, step_params=(1_000_000, 10_000_000, 50_000_000), step_reps=11,
            transfer_mb=(4, 40, 200), transfer_target_mb=40, transfer_reps=9,
            round_trip_params=10_000_000, round_trip_reps=15,
            worker_counts=(1, 2, 4), worker_params=10_000_000, worker_seconds=6.0, sync_rounds=30,
            peak_params=50_000_000, growth_params=1_000_000, growth_pushes=2000,
            durability_params=10_000_000, durability_pushes=30, versus_params=10_000_000, versus_reps=9,
            versus_worker_seconds=6.0, peers=True)


def run_bench(quick: bool = False, json_path: str | None = None,
              plot_path: str | None = "optserve-bench.png", peers: bool | None = None,
              scale_out_rate_mbit: float | None = None) -> int:
    """Runs every section, prints a table per section, writes the JSON and the plot; returns an exit status.

    `peers` runs PyTorch RPC and Ray beside optserve (None: the plan's choice, off in a quick run).
    `scale_out_rate_mbit` sets the scale-out section's link rate (None: the plan's).
    """
    missing = [name for name in ("optax", "psutil", "matplotlib") if not _importable(name)]
    if missing:
        print(f"optserve bench needs {', '.join(missing)}: pip install 'optserve[server,bench]'")
        return 2
    _quiet_gpu_preallocation()
    plan = QUICK if quick else FULL
    if peers is not None:
        plan = replace(plan, peers=peers)
    if scale_out_rate_mbit is not None:
        plan = replace(plan, scale_out_rate_mbit=scale_out_rate_mbit)
    started = time.perf_counter()
    results: dict[str, Any] = {"quick": quick, "plan": asdict(plan)}

    results["environment"] = env = measure_environment()
    print_table("environment", ["item", "value"], [[k, str(v)] for k, v in env.items()], target=False)

    results["bandwidth"] = bw = measure_bandwidth(plan.bandwidth_bytes, plan.bandwidth_reps, env["platform"])
    print_bandwidth(bw)

    results["step"] = measure_step(plan.step_params, plan.step_reps, bw["best_gb_s"])
    print_step(results["step"])
    gc.collect()

    raw_grpc, raw_aio, raw_tcp = RawGrpc(), RawGrpc(model="aio"), RawTcp()
    try:
        with ServerProcess(["--metrics-port", "0"], log=io.StringIO()) as server:
            metrics = ServerMetrics(server)
            env["server_device"] = server_device(server)
            print(f"\nserver process: {server.address}, JAX device {env['server_device']}", flush=True)
            results["transfer"] = measure_transfer(server.address, metrics, raw_grpc, raw_tcp, plan.transfer_mb,
                                                   plan.transfer_reps, plan.transfer_target_mb)
            print_transfer(results["transfer"])
            print(results["transfer"]["note"])
            results["server_model"] = measure_server_model({"threads": raw_grpc, "aio": raw_aio},
                                                           plan.transfer_target_mb, plan.transfer_reps)
            print_server_model(results["server_model"])
            results["round_trip"] = measure_round_trip(server.address, metrics, raw_tcp, plan.round_trip_params,
                                                       plan.round_trip_reps, bw["best_gb_s"])
            print_round_trip(results["round_trip"])
            results["workers"] = measure_workers(server.address, plan.worker_counts, plan.worker_params,
                                                 plan.worker_seconds, plan.sync_rounds)
            print_workers(results["workers"])
            results["versus"] = measure_versus(server.address, metrics, raw_tcp, plan.versus_params, plan.versus_reps,
                                               plan.versus_worker_seconds, bw["best_gb_s"], plan.peers)
            print_versus(results["versus"])
            results["chunk_size"] = measure_chunk_sizes(server.address, plan.chunk_mb, plan.chunk_kib,
                                                        plan.transfer_reps)
            print_table(f"push {plan.chunk_mb} MB by client chunk size (medians)", ["chunk KiB", "push ms", "MB/s"],
                        [[str(r["chunk_kib"]), f"{r['push_ms']:.1f}", f"{r['mb_s']:.0f}"]
                         for r in results["chunk_size"]["rows"]], target=False)
    finally:
        raw_grpc.close()
        raw_aio.close()
        raw_tcp.close()

    results["memory"] = measure_memory(plan.peak_params, plan.growth_params, plan.growth_pushes)
    print_memory(results["memory"])

    results["durability"] = measure_durability(plan.durability_params, plan.durability_pushes)
    print_durability(results["durability"], plan)

    results["scale_out"] = measure_scale_out(plan.scale_out_shards, plan.scale_out_workers, plan.scale_out_params,
                                             plan.scale_out_tensors, plan.scale_out_seconds,
                                             plan.scale_out_rate_mbit)
    print_scale_out(results["scale_out"])

    results["targets"] = targets = [t for section in ("step", "transfer", "round_trip", "workers", "versus",
                                                                   "memory", "scale_out")
                                    for t in results[section]["targets"]]
    results["elapsed_s"] = time.perf_counter() - started
    env["load_average_at_end"] = load_average()
    print_table("targets", ["section", "target", "result"],
                 [[t["section"], t["name"]] + [target_text(t)] for t in targets])
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


# --- setup ---------------------------------------------------------------------


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _quiet_gpu_preallocation() -> None:
    """The bench process and its servers share one accelerator: none may take 75% of it up front."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
