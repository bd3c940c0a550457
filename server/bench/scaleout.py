"""The scale-out section: 3 workers pushing to 1, 2 and 3 shards, every process behind its own shaped link.

Servers and workers each run in their own network namespace (`netns`),
joined by veth links that `tc` limits to `rate_mbit` each way, so a server's
link, not this machine's cores, bounds what one shard can take in, as in a
cluster. Each worker is a sharded `Client([addresses])` pushing the whole
model's gradient (the client sends each shard its pieces at once) as fast as
it can; the figure is the aggregate of whole-model pushes per second.
Without root or `ip`/`tc` the section is skipped and says why.

`python -m optserve.server.bench.scaleout create|worker ...` is the code that
runs inside a namespace (the bench process has no address there); `... measure
--rate MBIT` runs the section alone.
"""

import argparse
import json
import os
import selectors
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from optserve.server.bench import netns
from optserve.server.bench.common import MB, make_target
from optserve.server.launch import ServerProcess

NAME = "scale-out"
MODULE = "optserve.server.bench.scaleout"  # run inside the namespaces: create, worker
CLIENT = "Client([addresses]) over the bulk channels (transport='network'), one logical optimizer"
START_TIMEOUT = 120.0  # seconds a worker may take to start and warm up
TARGET = 2.5  # aggregate pushes/s at 3 shards against 1


def model(params: int, tensors: int) -> dict[str, tuple[int, ...]]:
    """`tensors` float32 tensors of `params` elements in all, equal but for the first, in creation order.

    Each is far below the sharded client's default `max_shard_bytes`, so it is placed whole, and 24 equal
    tensors spread evenly over 1, 2 or 3 shards: the links, not the placement, set the rate.
    """
    size = params // tensors
    return {f"layer_{i:02d}": (size + (params - size * tensors if i == 0 else 0),) for i in range(tensors)}


def measure_scale_out(shard_counts: Sequence[int], workers: int, params: int, tensors: int, seconds: float,
                      rate_mbit: float) -> dict:
    """Aggregate whole-model pushes per second of `workers` workers against each count of shards."""
    base = {"shard_counts": list(shard_counts), "workers": workers, "params": params, "tensors": tensors,
            "push_bytes": 4 * params, "seconds": seconds, "rate_mbit": rate_mbit, "client": CLIENT, "targets": []}
    reason = netns.unavailable()
    if reason is not None:
        return {**base, "skipped": reason, "rows": []}
    netns.remove_stale()
    names = [f"server{i}" for i in range(max(shard_counts))] + [f"worker{i}" for i in range(workers)]
    rows = []
    try:
        with netns.LinkedHosts(names, rate_mbit) as network:
            for count in shard_counts:
                servers = [network.hosts[f"server{i}"] for i in range(count)]
                clients = [network.hosts[f"worker{i}"] for i in range(workers)]
                rows.append(_measure(servers, clients, params, tensors, seconds, rate_mbit))
    except netns.NetnsError as err:  # e.g. a kernel without veth or tbf: the bench goes on without the section
        return {**base, "skipped": f"cannot build the namespaces and links: {err}", "rows": []}
    one = next((r for r in rows if r["shards"] == 1 and "error" not in r), None)
    for row in rows:
        if one is not None and "error" not in row:
            row["speedup"] = row["pushes_per_s"] / one["pushes_per_s"]
    most = rows[-1] if rows else {}
    if one is not None and "speedup" in most and most["shards"] > 1:
        base["targets"] = [make_target("scale_out", f"{workers} workers, {most['shards']} shards vs 1 "
                                       f"({rate_mbit:g} Mbit/s links)", most["speedup"], ">=", TARGET)]
    return {**base, "rows": rows}


def _measure(servers: list[netns.Host], workers: list[netns.Host], params: int, tensors: int, seconds: float,
             rate_mbit: float) -> dict:
    """One row: start a server per host, create the optimizer's parts, release the workers together."""
    row: dict[str, Any] = {"shards": len(servers)}
    processes: list[ServerProcess] = []
    try:
        for host in servers:
            processes.append(ServerProcess(["--host", host.address, "--insecure", "--shm-dir", "", "--bulk-port", "0"],
                                           log=open(os.devnull, "w"), prefix=host.command([]),
                                           start_timeout=START_TIMEOUT))
        addresses = ",".join(f"{host.address}:{process.port}" for host, process in zip(servers, processes))
        common = ["--addresses", addresses, "--params", str(params), "--tensors", str(tensors)]
        created = subprocess.run(workers[0].command([sys.executable, "-m", MODULE, "create", *common]),
                                 capture_output=True, text=True, timeout=START_TIMEOUT)
        if created.returncode != 0:
            return {**row, "error": _last_line(created.stderr)}
        reports = _run_workers(workers, common, seconds)
    except Exception as err:  # one row's failure is reported in its row, the bench goes on
        return {**row, "error": f"{type(err).__name__}: {_last_line(str(err))}"}
    finally:
        for process in processes:
            process.stop()
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        return {**row, "error": errors[0]}
    pushes = sum(r["pushes"] for r in reports)
    wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    link_mb_s = rate_mbit * 1e6 / 8 / MB
    return {**row, "pushes": pushes, "wall_s": wall, "pushes_per_s": pushes / wall,
            "mb_per_s": pushes * 4 * params / MB / wall, "server_links_mb_s": link_mb_s * len(servers),
            "median_push_ms": statistics.median(r["median_ms"] for r in reports)}


def _run_workers(hosts: list[netns.Host], common: list[str], seconds: float) -> list[dict]:
    """Starts a worker in each host, waits for all to be warm, releases them at once, collects their reports."""
    procs = [subprocess.Popen(host.command([sys.executable, "-m", MODULE, "worker", *common,
                                            "--worker-id", host.name, "--seconds", str(seconds)]),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for host in hosts]
    try:
        ready = [_read_report(proc, START_TIMEOUT) for proc in procs]
        failed = [r for r in ready if "error" in r]
        if failed:
            return failed
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return [_read_report(proc, START_TIMEOUT + seconds) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


def _read_report(proc: subprocess.Popen, timeout: float) -> dict:
    """The worker's next JSON line; its error when it ends or stays silent for `timeout` s."""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return {"error": f"a worker said nothing for {timeout:.0f} s"}
    line = proc.stdout.readline()
    if not line:
        proc.wait(30)
        return {"error": f"a worker ended (status {proc.returncode}): {_last_line(proc.stderr.read())}"}
    return json.loads(line)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


# --- inside a namespace ----------------------------------------------------------


def _client(addresses: list[str]):
    from optserve.client import Client

    return Client(addresses, timeout=120, transport="network")


def _create(args: argparse.Namespace) -> None:
    """Creates the logical optimizer over the shards and pushes one zero gradient to compile each shard's step."""
    params = {name: np.zeros(shape, np.float32) for name, shape in model(args.params, args.tensors).items()}
    with _client(args.addresses.split(",")) as client:
        opt = client.create_optimizer(NAME, params, {"learning_rate": 1e-3})
        opt.push(params)


def _worker(args: argparse.Namespace) -> None:
    """Warms up, says ready, waits for "go" on stdin, then pushes whole gradients for `seconds`; prints a report."""
    rng = np.random.default_rng(zlib.crc32(args.worker_id.encode()))
    grads = {name: rng.normal(0, 1e-3, shape).astype(np.float32)
             for name, shape in model(args.params, args.tensors).items()}
    with _client(args.addresses.split(",")) as client:
        opt = client.optimizer(NAME)
        opt.push(grads, worker_id=args.worker_id, seq=0)  # warm-up: connections, bulk channels
        print(json.dumps({"ready": True}), flush=True)
        if sys.stdin.readline().strip() != "go":
            return
        start = time.time()
        latencies = []
        while time.time() - start < args.seconds:
            began = time.perf_counter()
            opt.push(grads, worker_id=args.worker_id, seq=len(latencies) + 1)
            latencies.append(time.perf_counter() - began)
        end = time.time()
    print(json.dumps({"pushes": len(latencies), "start": start, "end": end,
                      "median_ms": statistics.median(latencies) * 1e3}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optserve.server.bench.scaleout")
    commands = parser.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("measure", help="run the section alone, with the full run's sizes, and print it")
    measure.add_argument("--rate", type=float, default=200.0, help="Mbit/s of every link (default %(default)s)")
    measure.add_argument("--params", type=int, default=2_000_000)
    measure.add_argument("--seconds", type=float, default=8.0)
    for command in ("create", "worker"):
        sub = commands.add_parser(command)
        sub.add_argument("--addresses", required=True, help="HOST:PORT of every shard, comma-separated")
        sub.add_argument("--params", type=int, required=True)
        sub.add_argument("--tensors", type=int, required=True)
        if command == "worker":
            sub.add_argument("--worker-id", required=True)
            sub.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    if args.command == "measure":
        from optserve.server.bench.report import print_scale_out

        print_scale_out(measure_scale_out((1, 2, 3), 3, args.params, 24, args.seconds, args.rate))
        return 0
    try:
        (_create if args.command == "create" else _worker)(args)
    except Exception as err:
        print(json.dumps({"error": f"{type(err).__name__}: {_last_line(str(err))}"}), flush=True)
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
