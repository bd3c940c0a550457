"""optserve against the parameter servers users know, on the same work, side by side in one run, with the floors.

The work of one round trip: a worker pushes `params` float32 gradients, the
server applies one Adam step, the worker gets the `params` weights back; as
one tensor ("one") and as 100 tensors of the same total ("mixed"), then 4
workers at once on one tensor each (round trips per second). Every system's
worker runs in a process of its own (`drivers`), their round trips interleaved
rep by rep so drift on a shared machine hits all alike. optserve's rows are its
transports ("local": shared memory, with the zero-copy API and with the plain
one; "network": the bulk channel; "grpc": the chunk stream), the peers' rows are
in `peer_servers`. The floors, measured here in the same reps:

- TCP floor: raw loopback TCP pushing and pulling the bytes into reused
  buffers (`peers.RawTcp`), plus the Adam bound (28 B/param at the measured
  memory bandwidth);
- shared-memory floor: one memory copy each way (NumPy `copyto` into a warm
  buffer), plus the same Adam bound.

A system or transport that cannot run here (a package not installed, a
transport the server refuses) reports its error in its row; the run goes on.
"""

import gc
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from optserve.client import Client
from optserve.server.bench.common import BYTES_PER_PARAM, CLIENT_TIMEOUT, make_target, time_once
from optserve.server.bench.compute import mixed_sizes
from optserve.server.bench.drivers import Driver, error_text, run_workers
from optserve.server.bench.peer_servers import RayPeer, TorchRpcPeer, gradients, missing
from optserve.server.bench.peers import RawTcp
from optserve.server.bench.server_stats import ServerMetrics

LAYOUTS = ("one", "mixed")
WORKERS = 4
# optserve's rows: (label, transport, API); "zero-copy" pushes the views of gradient_buffers() and pulls with
# copy=False, "plain" pushes its own arrays and pulls into the previous pull's buffer.
OPTSERVE_ROWS = (("optserve local zero-copy", "local", "zero-copy"), ("optserve local", "local", "plain"),
                 ("optserve network", "network", "plain"), ("optserve grpc", "grpc", "plain"))
PEER_ROWS = (("torch rpc tensorpipe default", "torch_rpc", "default"), ("torch rpc tcp", "torch_rpc", "tcp"),
             ("ray actor", "ray", ""))
OPTIMIZER_NAMES = {"one": "versus-one", "mixed": "versus-mixed"}


def layout_sizes(params: int) -> dict[str, list[int]]:
    """The tensor sizes of each layout: one tensor, and 100 mixed-size tensors of the same total."""
    return {"one": [params], "mixed": mixed_sizes(params)}


def tensor_names(sizes: Sequence[int]) -> list[str]:
    """Tensor names of a layout, in order."""
    return [f"t{i:03d}" for i in range(len(sizes))]


def measure_versus(address: str, metrics: ServerMetrics, raw_tcp: RawTcp, params: int, reps: int,
                   worker_seconds: float, bandwidth_gb_s: float, with_peers: bool) -> dict:
    """Every system's round trips on both layouts (medians), 4 workers' round trips/s, the floors and the targets.

    Each optserve row also records the transports the server counted its
    first round trip's bytes on, so a transport that fell back shows as such.
    """
    sizes = layout_sizes(params)
    with Client(address, timeout=CLIENT_TIMEOUT, transport="grpc") as client:
        for layout, layout_sizes_ in sizes.items():
            client.create_optimizer(OPTIMIZER_NAMES[layout], {name: np.zeros(n, np.float32) for name, n in
                                                                zip(tensor_names(layout_sizes_), layout_sizes_)},
                                    {"learning_rate": 1e-3})
        try:
            rows, systems = _start_systems(address, metrics, sizes, with_peers)
            try:
                floors = _time_interleaved(systems, rows, raw_tcp, params, reps, bandwidth_gb_s)
            finally:
                for system in systems.values():
                    _close(system)
            for row in rows:  # one system at a time: each gets the machine to itself
                if row.get("skipped"):
                    continue
                row["workers"] = _workers(row, address, sizes, worker_seconds)
                gc.collect()
        finally:
            for name in OPTIMIZER_NAMES.values():
                client.delete_optimizer(name)
    for row in rows:
        _finish_row(row, floors)
    targets = _targets(rows, floors, params)
    return {"params": params, "reps": reps, "workers": WORKERS, "worker_seconds": worker_seconds,
            "tensors": {layout: len(s) for layout, s in sizes.items()}, "floors": floors, "rows": rows,
            "ratios": _ratios(rows), "targets": targets, "peers_run": with_peers,
            "note": "round trip = push + one Adam step + pull, medians; ratios to floors measured in the same reps; "
                    "peers' servers run torch.optim.Adam (the Ray actor too) and answer with their live weights"}


# --- the systems -------------------------------------------------------------


def _start_systems(address: str, metrics: ServerMetrics, sizes: dict[str, list[int]],
                   with_peers: bool) -> tuple[list[dict], dict]:
    """Starts each system's timed worker; a row per system, with its error if it could not start."""
    rows: list[dict] = []
    systems: dict[str, Any] = {}
    for label, transport, api in OPTSERVE_ROWS:
        row = {"system": label, "kind": "optserve", "transport": transport, "api": api}
        rows.append(row)
        try:
            systems[label] = driver = Driver("optserve.server.bench.versus:OptserveWorker", address, transport, api,
                                             sizes, 0)
            before = metrics.bytes_by_transport(OPTIMIZER_NAMES["one"])
            driver.round_trip("one")
            after = metrics.bytes_by_transport(OPTIMIZER_NAMES["one"])
            row["server_transports"] = sorted(t for t, n in after.items() if n > before.get(t, 0.0))
        except Exception as exc:
            row["error"] = error_text(exc)
            if label in systems:
                _close(systems.pop(label))
    for label, peer, option in PEER_ROWS:
        row = {"system": label, "kind": "peer", "peer": peer, "option": option}
        rows.append(row)
        if not with_peers:
            row["skipped"] = True
            row["error"] = "skipped (quick run; --peers runs them)"
            continue
        absent = missing(peer)
        if absent:
            row["error"] = absent
            continue
        try:
            systems[label] = TorchRpcPeer(option, sizes) if peer == "torch_rpc" else RayPeer(sizes)
        except Exception as exc:
            row["error"] = error_text(exc)
    return rows, systems


def _time_interleaved(systems: dict[str, Any], rows: list[dict], raw_tcp: RawTcp, params: int, reps: int,
                      bandwidth_gb_s: float) -> dict:
    """Warm-up, then `reps` rounds of every system's round trip on each layout and of the floors; the floors."""
    nbytes = params * 4
    src, seg, out = np.full(params, 1.0, np.float32), np.full(params, 2.0, np.float32), np.ones(params, np.float32)
    floor_fns: dict[str, Callable[[], float]] = {
        "tcp_push": lambda: raw_tcp.push(src), "tcp_pull": lambda: raw_tcp.pull(nbytes),
        "copy_in": lambda: time_once(lambda: np.copyto(seg, src)),
        "copy_out": lambda: time_once(lambda: np.copyto(out, seg)),
    }
    by_label = {row["system"]: row for row in rows}
    times: dict[tuple[str, str], list[float]] = {(label, layout): [] for label in systems for layout in LAYOUTS}
    floor_times: dict[str, list[float]] = {name: [] for name in floor_fns}
    for rep in range(reps + 1):  # rep 0 warms up: connections, buffers, compiled steps
        for name, fn in floor_fns.items():
            value = fn()
            if rep:
                floor_times[name].append(value)
        for label, system in systems.items():
            for layout in LAYOUTS:
                errors = by_label[label].setdefault("errors", {})
                if layout in errors:
                    continue
                try:
                    value = system.round_trip(layout)
                except Exception as exc:
                    errors[layout] = error_text(exc)
                    continue
                if rep:
                    times[label, layout].append(value)
    for (label, layout), values in times.items():
        if values:
            by_label[label][f"{layout}_ms"] = statistics.median(values) * 1e3
    medians = {name: statistics.median(values) * 1e3 for name, values in floor_times.items()}
    bound_ms = BYTES_PER_PARAM * params / (bandwidth_gb_s * 1e9) * 1e3
    return {**{f"{name}_ms": value for name, value in medians.items()}, "adam_bound_ms": bound_ms,
            "tcp_floor_ms": medians["tcp_push"] + medians["tcp_pull"] + bound_ms,
            "shm_floor_ms": medians["copy_in"] + medians["copy_out"] + bound_ms,
            "bytes_each_way": nbytes, "bandwidth_gb_s": bandwidth_gb_s}


def _workers(row: dict, address: str, sizes: dict[str, list[int]], seconds: float) -> dict:
    """4 workers at once on one tensor each: round trips per second, or the error that stopped them."""
    sizes_one = {"one": sizes["one"]}
    if row.get("error"):  # it could not start: its workers would not either
        return {"workers": WORKERS, "error": row["error"]}
    try:
        if row["kind"] == "optserve":
            return run_workers("optserve.server.bench.versus:OptserveWorker",
                               lambda i: (address, row["transport"], row["api"], sizes_one, 100 + i), WORKERS, "one",
                               seconds)
        peer = TorchRpcPeer(row["option"], sizes_one) if row["peer"] == "torch_rpc" else RayPeer(sizes_one)
        try:
            return peer.workers(WORKERS, seconds)
        finally:
            _close(peer)
    except Exception as exc:
        return {"workers": WORKERS, "error": error_text(exc)}


def _close(system: Any) -> None:
    try:
        system.close()
    except Exception:  # a system that failed is closed as far as it can be
        pass


class OptserveWorker:
    """A worker process of optserve: its own Client on one transport, gradients ready, one push + pull per trip.

    API "zero-copy": the gradients are written once into `gradient_buffers()`
    (as a worker computing straight into the segment would) and those views are
    pushed; the pull is `pull(copy=False)`. API "plain": `push(arrays)` and
    `pull(into=...)` of the previous pull's buffer.
    """

    def __init__(self, address: str, transport: str, api: str, sizes_by_layout: dict[str, list[int]], seed: int):
        self._client = Client(address, timeout=CLIENT_TIMEOUT, transport=transport)
        self._api = api
        self._opts, self._grads, self._pulled = {}, {}, {}
        for layout, sizes in sizes_by_layout.items():
            opt = self._client.optimizer(OPTIMIZER_NAMES[layout])
            grads = dict(zip(tensor_names(sizes), gradients(sizes, seed)))
            if api == "zero-copy":
                buffers = opt.gradient_buffers()
                for name, grad in grads.items():
                    np.copyto(buffers[name], grad.reshape(buffers[name].shape))  # into the view itself
                grads = buffers
            self._opts[layout], self._grads[layout] = opt, grads

    def round_trip(self, layout: str) -> None:
        """One push of the layout's gradients, then one pull of its weights."""
        opt = self._opts[layout]
        opt.push(self._grads[layout])
        if self._api == "zero-copy":
            self._pulled[layout] = opt.pull(copy=False)
        elif layout in self._pulled:
            opt.pull(into=self._pulled[layout])
        else:
            self._pulled[layout] = opt.pull()

    def close(self) -> None:
        """Closes the worker's client."""
        self._client.close()


# --- ratios and targets ------------------------------------------------------


def _finish_row(row: dict, floors: dict) -> None:
    """Adds the ratios to the floors and the 4 workers' round trips per second to a row."""
    for layout in LAYOUTS:
        ms = row.get(f"{layout}_ms")
        if ms is not None:
            row[f"{layout}_vs_tcp_floor"] = ms / floors["tcp_floor_ms"]
            row[f"{layout}_vs_shm_floor"] = ms / floors["shm_floor_ms"]
    workers = row.get("workers") or {}
    row["workers_round_trips_per_s"] = workers.get("round_trips_per_s")


def _ratios(rows: list[dict]) -> list[dict]:
    """Each optserve row against each peer that ran: time ratios per layout (< 1: optserve faster), rate ratio."""
    ratios = []
    for mine in (r for r in rows if r["kind"] == "optserve"):
        for peer in (r for r in rows if r["kind"] == "peer"):
            entry: dict[str, Any] = {"optserve": mine["system"], "peer": peer["system"]}
            for layout in LAYOUTS:
                a, b = mine.get(f"{layout}_ms"), peer.get(f"{layout}_ms")
                entry[f"{layout}_time_ratio"] = a / b if a and b else None
            a, b = mine.get("workers_round_trips_per_s"), peer.get("workers_round_trips_per_s")
            entry["workers_rate_ratio"] = a / b if a and b else None
            ratios.append(entry)
    return ratios


def _targets(rows: list[dict], floors: dict, params: int) -> list[dict]:
    """The issue's targets; a row that could not run holds NaN, which meets none."""
    by_label = {row["system"]: row for row in rows}
    local, network = by_label["optserve local zero-copy"], by_label["optserve network"]
    size = f"{params / 1e6:g}M"
    targets = []
    for layout in LAYOUTS:
        what = f"{size} {'1 tensor' if layout == 'one' else '100 tensors'}"
        targets.append(make_target("versus", f"same host round trip {what} vs TCP floor",
                                   local.get(f"{layout}_vs_tcp_floor", math.nan), "<=", 0.5))
        targets.append(make_target("versus", f"same host round trip {what} vs shared-memory floor",
                                   local.get(f"{layout}_vs_shm_floor", math.nan), "<=", 2.0))
        targets.append(make_target("versus", f"network round trip {what} vs TCP floor",
                                   network.get(f"{layout}_vs_tcp_floor", math.nan), "<=", 1.3))
    targets.append(make_target("versus", f"{WORKERS} workers at {size}, same host (round trips/s)",
                               local.get("workers_round_trips_per_s") or math.nan, ">=", 45, unit="/s"))
    targets.append(make_target("versus", f"{WORKERS} workers at {size}, network (round trips/s)",
                               network.get("workers_round_trips_per_s") or math.nan, ">=", 30, unit="/s"))
    return targets
