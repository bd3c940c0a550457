"""What a server process costs and reports: its memory, each durability mode's push, its own step time."""

import io
import re
import statistics
import tempfile
import threading
import time
import urllib.request
from typing import Any

import numpy as np

from optserve.client import Client
from optserve.server.bench.common import CLIENT_TIMEOUT, MB, make_target, time_reps
from optserve.server.launch import ServerProcess

STATE_BYTES_PER_PARAM = 12  # params, m and v in float32 (default config: no AMSGrad, no EMA)
RSS_GROWTH_LIMIT = 16 * MB  # "no growth": at most this much between the end of warm-up and the last push
DURABILITY_MODES = {
    "memory": [],
    "wal": ["--durability", "wal"],
    "none": ["--durability", "none"],
}

# --- memory ------------------------------------------------------------------


def measure_memory(peak_params: int, growth_params: int, growth_pushes: int) -> dict:
    """Peak RSS of a fresh server holding `peak_params`, then its RSS over `growth_pushes` small pushes."""
    import psutil

    rng = np.random.default_rng(4)
    with ServerProcess(log=io.StringIO()) as server:
        proc = psutil.Process(server.process.pid)
        sampler = _RssSampler(proc)
        idle = proc.memory_info().rss
        # "network": the server's own memory; a same-host client would add its segments (2 x the model, mapped
        # by both processes), which the versus section's shared-memory rows show instead
        with Client(server.address, timeout=CLIENT_TIMEOUT, transport="network") as client:
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
        make_target("memory", f"peak RSS vs 1.5 x state ({state / MB:.0f} MB) + 300 MB", peak / limit, "<=", 1.0),
        make_target("memory",
                    f"RSS growth over pushes {warmup}..{growth_pushes} (MB, limit {RSS_GROWTH_LIMIT / MB:g})",
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
                times = time_reps(lambda: opt.push(grad), pushes)
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


    def bytes_by_transport(self, optimizer: str) -> dict[str, float]:
        """Tensor bytes one optimizer has received and sent so far, by the transport the server counted them on."""
        with urllib.request.urlopen(self.url, timeout=30) as reply:
            text = reply.read().decode()
        totals: dict[str, float] = {}
        pattern = rf'^optserve_(?:received|sent)_bytes_total\{{(?=[^}}]*optimizer="{re.escape(optimizer)}")' \
                  r'[^}]*transport="([^"]+)"[^}]*\} (\S+)$'
        for transport, value in re.findall(pattern, text, re.MULTILINE):
            totals[transport] = totals.get(transport, 0.0) + float(value)
        return totals


def server_device(server: ServerProcess) -> str:
    """The JAX device the server reported in its "listening on" log line."""
    match = next((m for m in map(re.compile(r"JAX device: (.+)\)\s*$").search, server.lines) if m), None)
    return match.group(1) if match else "unknown"


def mean_delta(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Mean seconds per step between two `ServerMetrics.step_seconds` readings (NaN if no step ran)."""
    steps = after[1] - before[1]
    return (after[0] - before[0]) / steps if steps else float("nan")
