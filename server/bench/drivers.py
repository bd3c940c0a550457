"""Child processes that run one system's worker on the bench's command, so every system runs in its own processes.

A `Driver` is one worker process: it builds its worker (a callable made by a
factory named by module and attribute, so the child imports only what that
system needs), then times one round trip per command; the bench process sends
the commands, so the systems' round trips interleave rep by rep. `run_workers`
starts `count` such worker processes together and counts their round trips for
a while. Every failure in a child comes back as an error string, never as a crash
of the bench.
"""

import importlib
import multiprocessing
import statistics
import time
from collections.abc import Callable
from typing import Any

READY_TIMEOUT = 300.0  # seconds a worker may take to start (Ray and torch.distributed start slowly)
REPLY_TIMEOUT = 300.0  # seconds one timed round trip may take at most


class BenchError(RuntimeError):
    """A worker process failed; the message is its error, one line."""


def error_text(exc: BaseException) -> str:
    """One line naming an error: its type and the first line of its message."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0] if message else ''}"[:300]


def load(factory: str) -> Callable[..., Any]:
    """The attribute a "module:attribute" name names, imported in the process that calls it."""
    module, _, attribute = factory.partition(":")
    return getattr(importlib.import_module(module), attribute)


class Driver:
    """One worker process of a system: `round_trip(layout)` times one push + step + pull there."""

    def __init__(self, factory: str, *args: Any):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no JAX, no inherited gRPC state
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_drive, args=(child, factory, args), daemon=True)
        self.process.start()
        child.close()
        self._reply(READY_TIMEOUT)

    def round_trip(self, layout: str) -> float:
        """Seconds of one round trip of `layout`, as the worker saw it; BenchError if it failed."""
        self._conn.send(("round_trip", layout))
        return self._reply(REPLY_TIMEOUT)

    def call(self, command: str, *args: Any) -> Any:
        """Runs one of the worker's other commands (a method of the worker object) and returns its answer."""
        self._conn.send((command, *args))
        return self._reply(REPLY_TIMEOUT)

    def close(self) -> None:
        """Asks the worker to close, then ends its process."""
        try:
            self._conn.send(("close",))
            self._reply(60)
        except (BenchError, OSError, EOFError):
            pass
        self._conn.close()
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)

    def _reply(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise BenchError(f"no answer from the worker process in {timeout:.0f} s")
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise BenchError(f"the worker process ended (exit code {self.process.exitcode})") from None
        if status == "error":
            raise BenchError(value)
        return value


def _drive(conn: Any, factory: str, args: tuple) -> None:
    """Child process: builds the worker, then answers commands until "close" or the pipe closes."""
    try:
        worker = load(factory)(*args)
    except BaseException as exc:  # reported to the bench, which records it for this system's rows
        conn.send(("error", error_text(exc)))
        return
    conn.send(("ok", None))
    while True:
        try:
            command, *rest = conn.recv()
        except EOFError:
            command, rest = "close", []
        try:
            if command == "close":
                getattr(worker, "close", lambda: None)()
                conn.send(("ok", None))
                return
            if command == "round_trip":
                started = time.perf_counter()
                worker.round_trip(*rest)
                conn.send(("ok", time.perf_counter() - started))
            else:
                conn.send(("ok", getattr(worker, command)(*rest)))
        except BaseException as exc:
            try:
                conn.send(("error", error_text(exc)))
            except OSError:
                return


def run_workers(factory: str, args_of: Callable[[int], tuple], count: int, layout: str, seconds: float) -> dict:
    """`count` worker processes released together, each doing round trips of `layout` for `seconds`.

    `args_of(i)` are worker i's factory arguments. Returns the aggregate row:
    round trips, wall seconds, round trips per second and the median round trip.
    """
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(count + 1), context.Queue()
    procs = [context.Process(target=_loop_worker, args=(factory, args_of(i), layout, seconds, barrier, results),
                             daemon=True) for i in range(count)]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=READY_TIMEOUT)
    except Exception:  # a worker failed to start: its report says why
        pass
    reports = []
    for _ in procs:
        try:
            reports.append(results.get(timeout=READY_TIMEOUT + seconds))
        except Exception:
            reports.append({"error": "a worker process did not report"})
    for proc in procs:
        proc.join(60)
        if proc.is_alive():
            proc.terminate()
    return workers_row(count, reports)


def workers_row(count: int, reports: list[dict]) -> dict:
    """The aggregate of workers' reports, or the first worker's error."""
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        return {"workers": count, "error": errors[0]}
    trips = sum(r["round_trips"] for r in reports)
    wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return {"workers": count, "round_trips": trips, "seconds": wall, "round_trips_per_s": trips / wall,
            "median_round_trip_ms": statistics.median(r["median_ms"] for r in reports)}


def _loop_worker(factory: str, args: tuple, layout: str, seconds: float, barrier: Any, results: Any) -> None:
    """Worker process: builds its worker, warms up once, waits for the others, then loops for `seconds`."""
    worker = None
    try:
        worker = load(factory)(*args)
        worker.round_trip(layout)  # warm-up: connections, buffers, the server's compiled step
    except BaseException as exc:
        results.put({"error": error_text(exc)})
        barrier.abort()
        return
    try:
        barrier.wait(timeout=READY_TIMEOUT)
        start = time.time()
        latencies = []
        while time.time() - start < seconds:
            started = time.perf_counter()
            worker.round_trip(layout)
            latencies.append(time.perf_counter() - started)
        results.put({"round_trips": len(latencies), "start": start, "end": time.time(),
                     "median_ms": statistics.median(latencies) * 1e3})
    except BaseException as exc:
        results.put({"error": error_text(exc)})
    finally:
        try:
            getattr(worker, "close", lambda: None)()
        except Exception:
            pass
