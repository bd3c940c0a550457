"""Transfer sections: push and pull against the reference peers, the round trip, chunk sizes, workers,
and the server model of the bare gRPC service."""

import gc
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from optserve.client import Client
from optserve.wire.chunks import CHUNK_BYTES
from optserve.server.bench.common import BYTES_PER_PARAM, CLIENT_TIMEOUT, MB, make_target, time_once, time_reps
from optserve.server.bench.peers import RawGrpc, RawTcp
from optserve.server.bench.server_stats import ServerMetrics, mean_delta

# --- transfer: optserve push/pull vs a bare gRPC stream vs raw TCP ------------


def measure_transfer(address: str, metrics: ServerMetrics, raw_grpc: RawGrpc, raw_tcp: RawTcp,
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
            reused = opt.pull()  # pulls land in this buffer, as raw TCP's land in one it reuses
            methods: dict[str, Callable[[], float]] = {
                "optserve push": lambda: time_once(lambda: opt.push(grad)),
                "grpc push": lambda: raw_grpc.push(grad["w"]),
                "tcp push": lambda: raw_tcp.push(grad["w"]),
                "optserve pull": lambda: time_once(lambda: opt.pull(into=reused)),
                "optserve fresh pull": lambda: time_once(opt.pull),
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
                                   "server_step_ms": mean_delta(before, after) * 1e3}
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
        targets.append(make_target("transfer", f"{way} {target_mb} MB vs bare gRPC stream", row[f"{way}_vs_grpc"],
                                   ">=", 0.9))
        targets.append(make_target("transfer", f"{way} {target_mb} MB vs raw TCP", row[f"{way}_vs_tcp"], ">=", 0.7))
    return {"rows": rows, "targets": targets, "target_mb": target_mb, "chunk_bytes": CHUNK_BYTES,
            "note": "optserve push is the whole call, including the server's step (server_step_ms); optserve pull "
                    "fills the previous pull's buffer (pull(into=...)), a fresh pull allocates new memory"}


# --- server model: the bare gRPC service on grpc's thread pool vs grpc.aio ---


def measure_server_model(peers: dict[str, RawGrpc], size_mb: int, reps: int) -> dict:
    """Push and pull MB/s of the bare gRPC service on "threads" and on "aio", interleaved rep by rep (medians).

    The client is the same blocking channel for every model, so the server
    model alone differs; the figures pick the model by measurement.
    """
    nbytes = size_mb * MB
    array = np.random.default_rng(5).standard_normal(nbytes // 4, dtype=np.float32)
    methods: dict[tuple[str, str], Callable[[], float]] = {}
    for model, peer in peers.items():
        methods[model, "push"] = lambda peer=peer: peer.push(array)
        methods[model, "pull"] = lambda peer=peer: peer.pull(nbytes)
    for fn in methods.values():  # warm-up: the channels connect, the servers allocate their buffers
        fn()
    times: dict[tuple[str, str], list[float]] = {method: [] for method in methods}
    for _ in range(reps):  # interleaved, so drift on a shared machine hits every model alike
        for method, fn in methods.items():
            times[method].append(fn())
    rows: dict[str, dict[str, Any]] = {model: {"model": model} for model in peers}
    for (model, way), values in times.items():
        rows[model][f"{way}_ms"] = statistics.median(values) * 1e3
        rows[model][f"{way}_mb_s"] = nbytes / statistics.median(values) / MB
    ratio = {way: rows["aio"][f"{way}_mb_s"] / rows["threads"][f"{way}_mb_s"] for way in ("push", "pull")}
    return {"mb": size_mb, "bytes": nbytes, "reps": reps, "chunk_bytes": CHUNK_BYTES, "rows": rows,
            "aio_vs_threads": ratio}


# --- round trip: push + step + pull, float32 and bfloat16 wire ---------------


def measure_round_trip(address: str, metrics: ServerMetrics, raw_tcp: RawTcp, params: int, reps: int,
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
            reused = opt.pull()
            before = metrics.step_seconds("round-trip")
            push_times, pull_times = [], []
            for _ in range(reps):  # raw TCP interleaved, so drift on a shared machine hits the floor alike
                push_times.append(time_once(push))
                pull_times.append(time_once(lambda: opt.pull(into=reused)))
                tcp_push.append(raw_tcp.push(init))
                tcp_pull.append(raw_tcp.pull(init.nbytes))
            compute_s = mean_delta(before, metrics.step_seconds("round-trip"))
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
        make_target("round_trip", f"round trip {params / 1e6:g}M float32 vs physical floor", f32["vs_floor"],
                    "<=", 1.5),
        make_target("round_trip", "bfloat16 vs float32 wire, push transfer speedup", push_transfer_speedup, ">=", 1.6),
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
    client._local = client._bulk = None  # the chunk stream only: the codec is what this times
    opt = Optimizer(client, "round-trip")
    opt.push({"w": grad}, **push_options)
    reused = opt.pull()
    push = statistics.median(time_reps(lambda: opt.push({"w": grad}, **push_options), reps))
    pull = statistics.median(time_reps(lambda: opt.pull(into=reused), reps))
    return push, pull


class _Loopback:
    """Stands in for the push and pull calls: each message goes through the serializers gRPC would
    use, then the server's codec decodes the push into a reused buffer (and checks it for NaN/Inf, as
    the default policy does) or encodes the pull from a copy of the device weights in a reused buffer,
    as the server does."""

    def __init__(self, params: dict[str, np.ndarray]):
        import jax

        from optserve.server import codec
        from optserve.v1 import optserve_pb2 as pb
        from optserve.wire.chunks import stream_message_parser
        from optserve.wire.layout import aligned_empty

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
        grads = self._codec.decode_gradients(header, chunks, self._shapes, 1 << 62,
                                             into=lambda extent, total: self._buffer(total))
        for grad in grads.values():
            values = grad[1] if isinstance(grad, tuple) else grad
            with np.errstate(invalid="ignore"):
                if not np.isfinite(values).all():
                    raise ValueError("non-finite gradient")
        return self._reply

    def pull(self, request, timeout=None, wait_for_ready=None):
        arrays = []
        for name in self._shapes:  # into a reused host buffer, as the server snapshots into a pooled one
            weights = np.asarray(self._weights[name])
            host = self._buffer(weights.nbytes)[:weights.nbytes].view(weights.dtype).reshape(weights.shape)
            np.copyto(host, weights)
            arrays.append((name, host))
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
                times[kib].append(time_once(lambda handle=handle: handle.push(grad)))
        creator.delete_optimizer("chunk-size")
    finally:
        for client in clients.values():
            client.close()
    rows = [{"chunk_kib": kib, "push_ms": statistics.median(t) * 1e3,
             "mb_s": size_mb * MB / statistics.median(t) / 1e6} for kib, t in times.items()]
    return {"size_mb": size_mb, "rows": rows, "best_chunk_kib": min(rows, key=lambda r: r["push_ms"])["chunk_kib"]}


# --- concurrent workers ------------------------------------------------------


def measure_workers(address: str, counts: Sequence[int], params: int, seconds: float, sync_rounds: int) -> dict:
    """Worker processes pushing float32 gradients to one optimizer, all at once.

    Async: each worker pushes for `seconds`. Sync: each of `count` workers
    pushes `sync_rounds` rounds to an optimizer with `num_workers=count`,
    waiting for every round, so a round's time includes the on-device sum.
    """
    push_bytes = params * 4
    rows, sync_rows = [], []
    with Client(address, timeout=CLIENT_TIMEOUT) as client:
        opt = client.create_optimizer("workers", {"w": np.zeros(params, np.float32)})
        opt.push({"w": np.zeros(params, np.float32)})  # compiles the step
        for count in counts:
            reports = _run_workers(address, "workers", params, count, seconds, None)
            rows.append(_workers_row(count, reports, push_bytes))
        client.delete_optimizer("workers")
        for count in counts[1:]:
            client.create_optimizer("sync-workers", {"w": np.zeros(params, np.float32)}, mode="sync",
                                    num_workers=count)
            reports = _run_workers(address, "sync-workers", params, count, seconds, sync_rounds)
            sync_rows.append(_workers_row(count, reports, push_bytes))
            client.delete_optimizer("sync-workers")
    one, most = rows[0], rows[-1]
    targets = [make_target("workers", f"{most['workers']} workers aggregate vs {one['workers']}",
                            most["steps_per_s"] / one["steps_per_s"], ">=", 1.0)]
    return {"params": params, "push_bytes": push_bytes, "rows": rows, "sync_rounds": sync_rounds,
            "sync_rows": sync_rows, "targets": targets}


def _run_workers(address: str, name: str, params: int, count: int, seconds: float,
                 sync_rounds: int | None) -> list[dict]:
    """Starts `count` worker processes, releases them together and collects their reports."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(count + 1), context.Queue()
    procs = [context.Process(target=_push_worker, args=(address, name, params, seconds, sync_rounds, w, barrier,
                                                         results), daemon=True)
             for w in range(count)]
    for proc in procs:
        proc.start()
    barrier.wait(timeout=300)
    reports = [results.get(timeout=300 + seconds) for _ in procs]
    for proc in procs:
        proc.join(60)
    return reports


def _workers_row(count: int, reports: list[dict], push_bytes: int) -> dict:
    """Aggregate figures of one run: steps/s counts pushes (async) or pushes per round (sync) alike."""
    pushes = sum(r["pushes"] for r in reports)
    wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return {"workers": count, "pushes": pushes, "seconds": wall, "steps_per_s": pushes / wall,
            "mb_per_s": pushes * push_bytes / wall / MB,
            "median_push_ms": statistics.median(r["median_push_ms"] for r in reports)}


def _push_worker(address: str, name: str, params: int, seconds: float, sync_rounds: int | None, worker: int,
                 barrier: Any, results: Any) -> None:
    """Worker process: async, a warm-up push then pushes for `seconds`; sync, `sync_rounds` rounds in a row."""
    with Client(address, timeout=CLIENT_TIMEOUT) as client:
        opt = client.optimizer(name)
        grads = {"w": np.random.default_rng(100 + worker).standard_normal(params, dtype=np.float32) * np.float32(1e-3)}
        # warm-up (a sync round compiles the sum for this many workers; every worker pushes, so it closes)
        version = opt.push(grads) if sync_rounds is None else opt.push(grads, worker_id=f"w{worker}", base_version=0)
        barrier.wait(timeout=300)
        start = time.time()
        latencies = []
        if sync_rounds is None:
            while time.time() - start < seconds:
                latencies.append(time_once(lambda: opt.push(grads)))
        else:
            for _ in range(sync_rounds):
                started = time.perf_counter()
                version = opt.push(grads, worker_id=f"w{worker}", base_version=version)
                latencies.append(time.perf_counter() - started)
        results.put({"pushes": len(latencies), "start": start, "end": time.time(),
                     "median_push_ms": statistics.median(latencies) * 1e3})
