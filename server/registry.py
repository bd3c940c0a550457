"""The optimizers a server holds: their state, locks, versions, rounds and persistence.

The registry owns concurrency: each optimizer applies one change at a time
under its own lock, and a pull copies its tensors under the same lock, so it
never sees half of a step. With a data dir, every change is logged (and
fsynced) before it is applied, so an acknowledged push survives a crash.
Requests arrive here already decoded and checked.
"""

import logging
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import numpy as np

from optserve.client.wire import ChunkBuffer, padded_bytes
from optserve.server.codec import Gradient
from optserve.server.engine import adam
from optserve.server.engine.config import AdamConfig, parse_config
from optserve.server.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from optserve.server.metrics import Metrics
from optserve.server.modes import DedupTable, PushResult, RoundSum, TrainingMode
from optserve.server.storage import Checkpoint, LogRecord, OptimizerStore, list_stores
from optserve.v1 import optserve_pb2 as pb

log = logging.getLogger("optserve.registry")

NON_FINITE_POLICIES = ("refuse", "apply")
STATE_KINDS = {"weights": "params", "ema": "ema", "m": "m", "v": "v", "vhat": "vhat"}  # pull kind -> engine slot
_INT32_MAX = 2**31 - 1  # the engine's iteration counter saturates here
RATE_WINDOW = 10.0  # seconds over which pushes per second are counted


@dataclass(frozen=True)
class OptimizerInfo:
    """A snapshot of one optimizer's metadata."""

    name: str
    iterations: int
    version: int
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    device: str
    non_finite_policy: str
    next_learning_rate: float
    training_mode: TrainingMode
    pending_gradients: int  # sync: gradients in the open round
    saved_version: int  # version of the newest checkpoint; -1 without a data dir
    pushes_per_second: float  # accepted pushes over the last RATE_WINDOW seconds
    last_push_age: float | None  # seconds since the last accepted push; None before the first


@dataclass(frozen=True)
class Persistence:
    """Where and how a registry keeps its optimizers on disk."""

    data_dir: Path
    durability: str = "wal"  # "wal": log every change before applying it; "none": checkpoints only
    checkpoint_every: int = 1000  # steps between checkpoints
    checkpoint_interval: float = 300.0  # seconds between checkpoints of an optimizer that changed


class Optimizer:
    """One named optimizer: Adam state on the device, and the rules that turn pushes into steps."""

    def __init__(self, name: str, config: AdamConfig, non_finite_policy: str, training_mode: TrainingMode,
                 state: adam.AdamState, version: int = 0, store: OptimizerStore | None = None,
                 on_step: Callable[["Optimizer"], None] = lambda optimizer: None, metrics: Metrics | None = None):
        self.name = name
        self.config = config
        self.non_finite_policy = non_finite_policy
        self.training_mode = training_mode
        self.shapes = {key: tuple(value.shape) for key, value in state.params.items()}
        self.rounds_closed_by_timeout = 0
        self.saved_version = -1 if store is None else version
        self.saved_at = time.monotonic()
        self._state = state
        self._step = adam.make_step(config, list(self.shapes))
        self._store = store
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()  # one checkpoint at a time, outside the state lock
        self._version_changed = threading.Condition(self._lock)
        self._version = version
        self._iterations = int(state.iterations)
        self._deleted = False
        self._dedup = DedupTable()
        self._round: dict[str, Mapping[str, Gradient]] = {}  # sync: worker_id -> gradients, for self._version
        self._round_seqs: dict[str, int | None] = {}  # sync: worker_id -> seq of its gradient in the round
        self._round_timer: threading.Timer | None = None
        self._round_sum = RoundSum(training_mode.aggregation, self.shapes)
        self._dropped_round = -1  # sync: the version of the last round that could not be logged
        self._on_step = on_step  # told after every step, under the lock (it must not block)
        self._metrics = metrics or Metrics()
        self._push_times: deque[float] = deque(maxlen=1024)  # monotonic times of recent accepted pushes

    @property
    def version(self) -> int:
        return self._version

    def push(self, grads: Mapping[str, Gradient], worker_id: str = "", seq: int | None = None,
             base_version: int | None = None, timeout: float | None = None,
             cancelled: threading.Event | None = None) -> PushResult:
        """Accepts one gradient for every tensor; see proto `PushHeader` for the arguments.

        Async: applies one Adam step now. Sync: adds the gradient to the open
        round and waits (up to `timeout` s) until the round has applied one
        step on the aggregate. Either way the answer comes after the step is
        applied and, with a data dir, logged. A refused push changes nothing.
        A wait ends early with CANCELLED once `cancelled` is set (its gradient
        stays in the round).
        """
        if seq is not None and not worker_id:
            raise InvalidArgument("worker_id: required with seq")
        sync = self.training_mode.mode == "sync"
        if sync and not worker_id:
            raise InvalidArgument("worker_id: required in sync mode (a round counts distinct workers)")
        if sync and base_version is None:
            raise InvalidArgument("base_version: required in sync mode (the version of the round)")
        if self.training_mode.max_staleness is not None and base_version is None:
            raise InvalidArgument("base_version: required when max_staleness is set")
        self._refuse_non_finite(grads)
        with self._lock:
            self._check_alive()
            if seq is not None:
                done = self._dedup.lookup(worker_id, seq)
                if done is not None:
                    self._wait_for(done.version, timeout, "the round of this push", cancelled)
                    self._metrics.pushes.labels(self.name, "duplicate").inc()
                    return replace(done, duplicate=True)
            self._check_base_version(base_version)
            staleness = None if base_version is None else self._version - base_version
            if not sync:
                result = self._apply(grads, [(worker_id, seq)] if seq is not None else [])
                if seq is not None:
                    self._dedup.record(worker_id, seq, result)
                self._count_accepted(staleness)
                return result
            result = self._add_to_round(worker_id, seq, grads)
            self._count_accepted(staleness)
            self._wait_for(result.version, timeout, "the round of this push", cancelled)
            return replace(result, iterations=self._iterations)

    def pull(self, kind: str, names: Sequence[str], min_version: int | None = None, timeout: float | None = None,
             into: Callable[[int], np.ndarray] | None = None,
             cancelled: threading.Event | None = None) -> tuple[int, int, list[tuple[str, np.ndarray]]]:
        """Copies one kind of state tensor out (see STATE_KINDS) as one snapshot.

        Waits (on a condition, not by polling) up to `timeout` seconds for
        `min_version`, or until `cancelled` is set (CANCELLED). Returns
        (version, iterations, [(name, float32 array)]);
        `names` empty means every tensor in creation order. `into(nbytes)`
        supplies an aligned buffer to copy into (a warm one from a pool); else
        fresh arrays are made.
        """
        if kind == "ema" and not self.config.use_ema:
            raise FailedPrecondition(f"kind: optimizer {self.name!r} keeps no EMA weights (use_ema is false)")
        if kind == "vhat" and not self.config.amsgrad:
            raise FailedPrecondition(f"kind: optimizer {self.name!r} keeps no vhat (amsgrad is false)")
        names = list(names) or list(self.shapes)
        for name in names:
            if name not in self.shapes:
                raise NotFound(f"names[{name!r}]: optimizer {self.name!r} has no tensor {name!r}")
        if len(set(names)) != len(names):
            raise InvalidArgument("names: a tensor is named twice")
        with self._lock:
            if min_version is not None:
                self._wait_for(min_version, timeout, "min_version", cancelled)
            self._check_alive()
            source = getattr(self._state, STATE_KINDS[kind])
            if into is None:
                return self._version, self._iterations, [(name, np.array(source[name])) for name in names]
            sizes = [4 * int(np.prod(self.shapes[name], dtype=np.int64)) for name in names]
            slots = ChunkBuffer(sizes, InvalidArgument, into(padded_bytes(sizes)))
            arrays = []
            for index, name in enumerate(names):
                array = slots.view(index, pb.DATA_TYPE_FLOAT32, self.shapes[name])
                np.copyto(array, np.asarray(source[name]))  # np.asarray of a CPU array copies nothing
                arrays.append((name, array))
            return self._version, self._iterations, arrays

    def finalize(self) -> None:
        """Copies the EMA into the weights (Keras `finalize_variable_values`)."""
        with self._lock:
            self._check_alive()
            if self.config.use_ema:
                self._log(LogRecord("finalize", self._version + 1))
                self._state = adam.finalize(self._state)
                self._bump_version()

    def save(self) -> int:
        """Writes a checkpoint of the current version; returns that version."""
        if self._store is None:
            raise FailedPrecondition("save: this server keeps no state on disk (start it with --data-dir)")
        with self._save_lock:
            with self._lock:
                self._check_alive()
                checkpoint = self.checkpoint()
                self._store.start_log(checkpoint.version)  # later changes go to a new log
            self._store.save(checkpoint)
            self.saved_version, self.saved_at = checkpoint.version, time.monotonic()
        return checkpoint.version

    def replay(self, record: LogRecord) -> None:
        """Re-applies a logged change through the same step, as on restore."""
        with self._lock:
            if record.kind == "finalize":
                self._state = adam.finalize(self._state)
                self._bump_version()
            else:
                self._step_with(record.grads)
            for worker_id, seq in record.workers:
                self._dedup.record(worker_id, seq, PushResult(self._version, self._iterations))

    def info(self) -> OptimizerInfo:
        """The optimizer's metadata as of now."""
        with self._lock:
            version, iterations, pending = self._version, self._iterations, len(self._round)
            device = next(iter(self._state.params.values())).devices().pop()
            now = time.monotonic()
            recent = sum(1 for t in self._push_times if now - t <= RATE_WINDOW)
            last_push_age = now - self._push_times[-1] if self._push_times else None
        return OptimizerInfo(
            name=self.name,
            iterations=iterations,
            version=version,
            config=self.config.to_keras_dict(),
            shapes=dict(self.shapes),
            device=f"{device.platform}:{device.id}",
            non_finite_policy=self.non_finite_policy,
            next_learning_rate=adam.learning_rate_at(self.config, iterations),
            training_mode=self.training_mode,
            pending_gradients=pending,
            saved_version=self.saved_version,
            pushes_per_second=recent / RATE_WINDOW,
            last_push_age=last_push_age,
        )

    def close(self, delete_files: bool = False) -> None:
        """Marks the optimizer deleted: calls that hold it fail, waiting calls wake up."""
        with self._save_lock, self._lock:
            self._deleted = True
            self._cancel_round_timer()
            self._version_changed.notify_all()
            if self._store is not None:
                self._store.delete() if delete_files else self._store.close()


    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, store: OptimizerStore, **hooks: Any) -> "Optimizer":
        """The optimizer a checkpoint describes; its later log records are replayed with `replay`."""
        meta = checkpoint.meta
        optimizer = cls(meta["name"], parse_config(meta["config"]), meta["non_finite_policy"],
                        TrainingMode(**meta["training_mode"]), adam.restore(meta["iterations"], checkpoint.slots),
                        meta["version"], store, **hooks)
        optimizer._dedup.load_json(meta["dedup"])
        return optimizer

    def checkpoint(self) -> Checkpoint:
        """The complete state as of now, as a checkpoint holds it (under the lock, or before it is shared)."""
        meta = {
            "name": self.name,
            "config": self.config.to_keras_dict(),
            "non_finite_policy": self.non_finite_policy,
            "training_mode": self.training_mode.to_dict(),
            "names": list(self.shapes),
            "iterations": self._iterations,
            "version": self._version,
            "dedup": self._dedup.to_json(),
        }
        return Checkpoint(meta, adam.export(self._state))

    def _count_accepted(self, staleness: int | None) -> None:
        self._push_times.append(time.monotonic())
        self._metrics.pushes.labels(self.name, "accepted").inc()
        if staleness is not None:
            self._metrics.staleness.labels(self.name).observe(staleness)

    def _refuse_non_finite(self, grads: Mapping[str, Gradient]) -> None:
        if self.non_finite_policy != "refuse":
            return
        for name, grad in grads.items():
            if not _all_finite(grad[1] if isinstance(grad, tuple) else grad):
                raise InvalidArgument(
                    f"gradients[{name!r}]: contains NaN or Inf (this optimizer's non_finite_policy is 'refuse')")

    def _check_base_version(self, base_version: int | None) -> None:
        if base_version is None:
            return
        if base_version > self._version:
            raise InvalidArgument(f"base_version: {base_version} is ahead of the current version {self._version}")
        if self.training_mode.mode == "sync" and base_version < self._version:
            raise Aborted(f"base_version: the round for version {base_version} is closed; the optimizer is at "
                          f"version {self._version}: pull and push for that round")
        limit = self.training_mode.max_staleness
        if limit is not None and self._version - base_version > limit:
            raise Aborted(f"base_version: {base_version} is {self._version - base_version} versions behind the "
                          f"current version {self._version} (max_staleness {limit}): pull and recompute")

    def wake_waiters(self) -> None:
        """Wakes every waiting call, so that one whose `cancelled` event is set stops waiting."""
        with self._lock:
            self._version_changed.notify_all()

    def _wait_for(self, version: int, timeout: float | None, what: str,
                  cancelled: threading.Event | None = None) -> None:
        """Waits, under the lock, until the optimizer reaches `version` (or `cancelled` is set)."""
        reached = self._version_changed.wait_for(
            lambda: self._version >= version or self._deleted or self._dropped_round == version
            or (cancelled is not None and cancelled.is_set()), timeout)
        self._check_alive()
        if self._version < version and cancelled is not None and cancelled.is_set():
            raise Cancelled(f"{what}: the call ended (cancelled, or its client went away) while waiting for "
                            f"version {version}")
        if self._version < version and self._dropped_round == version:
            raise ResourceExhausted(f"{what}: the round for version {version} was dropped: the data dir is full")
        if not reached:
            raise DeadlineExceeded(f"{what}: optimizer {self.name!r} is at version {self._version}, "
                                   f"not yet {version}, after {timeout:.3g} s")

    def _apply(self, grads: Mapping[str, Gradient], workers: list[tuple[str, int]]) -> PushResult:
        """Logs, then applies, one Adam step, under the lock."""
        self._log(LogRecord("step", self._version + 1, workers, dict(grads)))
        self._step_with(grads)
        return PushResult(self._version, self._iterations)

    def _step_with(self, grads: Mapping[str, Gradient]) -> None:
        started = time.perf_counter()
        device_grads = {name: _to_device(grads[name]) for name in self.shapes}
        self._state = self._step(self._state, device_grads)
        jax.block_until_ready(self._state)
        self._iterations = min(self._iterations + 1, _INT32_MAX)
        self._bump_version()
        self._metrics.observe_step(self.name, time.perf_counter() - started, self._version, grads)
        self._on_step(self)

    def _log(self, record: LogRecord) -> None:
        if self._store is not None:
            self._store.append(record)

    def _add_to_round(self, worker_id: str, seq: int | None, grads: Mapping[str, Gradient]) -> PushResult:
        """Sync mode, under the lock: one worker's gradient joins the open round."""
        if worker_id in self._round:
            raise Aborted(f"worker_id: {worker_id!r} has pushed for version {self._version} already; "
                          f"wait for version {self._version + 1}")
        result = PushResult(self._version + 1, self._iterations)
        self._round[worker_id], self._round_seqs[worker_id] = grads, seq
        if seq is not None:
            self._dedup.record(worker_id, seq, result)
        if len(self._round) >= self.training_mode.num_workers:
            self._close_round()
        elif self._round_timer is None:
            self._round_timer = threading.Timer(self.training_mode.sync_timeout, self._close_round_on_timeout,
                                                args=(self._version,))
            self._round_timer.daemon = True
            self._round_timer.start()
        return result

    def _close_round(self) -> None:
        """Applies one step on the round's aggregate, under the lock."""
        self._cancel_round_timer()
        combined = self._round_sum.combine(self._round)
        workers = [(w, s) for w, s in sorted(self._round_seqs.items()) if s is not None]
        try:
            self._apply(combined, workers)
        except ResourceExhausted:  # the log is full: the round's pushes are refused, retries start over
            for worker_id, seq in workers:
                self._dedup.forget(worker_id, seq)
            self._dropped_round = self._version + 1
            raise
        finally:
            self._round, self._round_seqs = {}, {}
            self._version_changed.notify_all()

    def _close_round_on_timeout(self, round_version: int) -> None:
        with self._lock:
            if self._deleted or self._version != round_version or not self._round:
                return
            log.warning("optimizer %r: sync round for version %d closed by timeout after %.3g s with %d of %d "
                        "gradients (workers %s)", self.name, round_version + 1, self.training_mode.sync_timeout,
                        len(self._round), self.training_mode.num_workers, sorted(self._round))
            self.rounds_closed_by_timeout += 1
            self._metrics.rounds_timed_out.labels(self.name).inc()
            self._round_timer = None
            try:
                self._close_round()
            except ResourceExhausted as err:
                log.error("optimizer %r: sync round for version %d dropped: %s", self.name, round_version + 1, err)

    def _cancel_round_timer(self) -> None:
        if self._round_timer is not None:
            self._round_timer.cancel()
            self._round_timer = None

    def _bump_version(self) -> None:
        self._version += 1
        self._version_changed.notify_all()

    def _check_alive(self) -> None:
        if self._deleted:
            raise NotFound(f"optimizer {self.name!r} was deleted")


class Registry:
    """The named optimizers of one server, and their persistence when it has a data dir."""

    def __init__(self, persistence: Persistence | None = None, max_optimizers: int = 1000,
                 metrics: Metrics | None = None):
        self.persistence = persistence
        self.max_optimizers = max_optimizers
        self.metrics = metrics or Metrics()
        self._lock = threading.Lock()
        self._optimizers: dict[str, Optimizer] = {}
        self._ready = persistence is None  # with a data dir: after restore()
        self._checkpointer: threading.Thread | None = None
        self._stop = threading.Event()
        self._checkpoint_due = threading.Event()

    def create(self, name: str, config: Mapping[str, Any], params: Mapping[str, np.ndarray],
               non_finite_policy: str = "refuse", training_mode: TrainingMode = TrainingMode()) -> Optimizer:
        """Creates an optimizer (and its first checkpoint); ALREADY_EXISTS if the name is taken."""
        if non_finite_policy not in NON_FINITE_POLICIES:
            raise InvalidArgument(f"non_finite_policy: must be one of {NON_FINITE_POLICIES}")
        self._check_ready()
        adam_config = parse_config(config)
        self._refuse_taken(name)
        store = None
        if self.persistence is not None:
            store = OptimizerStore(self.persistence.data_dir / name, self.persistence.durability)
        optimizer = Optimizer(name, adam_config, non_finite_policy, training_mode, adam.init(params, adam_config),
                              store=store, on_step=self._note_step, metrics=self.metrics)
        with self._lock:
            self._refuse_taken(name)
            if store is not None:
                try:
                    store.create(optimizer.checkpoint())
                except BaseException:
                    shutil.rmtree(store.directory, ignore_errors=True)
                    raise
            self._optimizers[name] = optimizer
        return optimizer

    def get(self, name: str) -> Optimizer:
        """The optimizer of that name; NOT_FOUND if there is none."""
        self._check_ready()
        optimizer = self._optimizers.get(name)
        if optimizer is None:
            raise NotFound(f"optimizer {name!r} not found")
        return optimizer

    def list(self) -> list[Optimizer]:
        """Every optimizer, sorted by name."""
        self._check_ready()
        with self._lock:
            return [self._optimizers[name] for name in sorted(self._optimizers)]

    def delete(self, name: str) -> None:
        """Removes an optimizer and its files; NOT_FOUND if there is none."""
        self._check_ready()
        with self._lock:
            optimizer = self._optimizers.pop(name, None)
        if optimizer is None:
            raise NotFound(f"optimizer {name!r} not found")
        optimizer.close(delete_files=True)
        self.metrics.forget(name)

    def restore(self) -> None:
        """Loads every optimizer of the data dir: its newest good checkpoint, then its log replayed.

        Until it returns, every call is answered UNAVAILABLE.
        """
        if self.persistence is None:
            return
        for store in list_stores(self.persistence.data_dir, self.persistence.durability):
            checkpoint, records = store.load()
            optimizer = Optimizer.from_checkpoint(checkpoint, store, on_step=self._note_step, metrics=self.metrics)
            for record in records:
                optimizer.replay(record)
            store.start_log(optimizer.version)
            self._optimizers[optimizer.name] = optimizer
            log.info("restored optimizer %r at version %d (checkpoint %d + %d logged changes)",
                     optimizer.name, optimizer.version, checkpoint.version, len(records))
        self._ready = True

    def start_checkpointer(self) -> None:
        """Starts the thread that checkpoints optimizers every N steps or S seconds."""
        if self.persistence is not None and self._checkpointer is None:
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="optserve-checkpointer",
                                                  daemon=True)
            self._checkpointer.start()

    def _note_step(self, optimizer: Optimizer) -> None:
        """Wakes the checkpointer when an optimizer is due by its step count."""
        if self.persistence and optimizer.version - optimizer.saved_version >= self.persistence.checkpoint_every:
            self._checkpoint_due.set()

    def save_all(self) -> None:
        """Stops the checkpointer and checkpoints every optimizer (on shutdown): the logs empty."""
        self._stop.set()
        self._checkpoint_due.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        for optimizer in self.list() if self.persistence is not None else []:
            try:
                version = optimizer.save()
                log.info("saved optimizer %r at version %d", optimizer.name, version)
            except NotFound:
                pass  # deleted meanwhile
            optimizer.close()

    def _checkpoint_loop(self) -> None:
        persistence = self.persistence
        while not self._stop.is_set():
            self._checkpoint_due.wait(timeout=min(persistence.checkpoint_interval, 1.0))
            self._checkpoint_due.clear()
            now = time.monotonic()
            for optimizer in self.list():
                behind = optimizer.version - optimizer.saved_version
                due = behind >= persistence.checkpoint_every or (
                    behind > 0 and now - optimizer.saved_at >= persistence.checkpoint_interval)
                if due and not self._stop.is_set():
                    try:
                        optimizer.save()
                    except (NotFound, ResourceExhausted, OSError) as err:
                        log.error("checkpoint of optimizer %r failed: %s", optimizer.name, err)

    def _check_ready(self) -> None:
        if not self._ready:
            raise Unavailable(f"restoring state from {self.persistence.data_dir}; retry shortly")

    def _refuse_taken(self, name: str) -> None:
        if name in self._optimizers:
            raise AlreadyExists(f"name: an optimizer named {name!r} exists already")
        if len(self._optimizers) >= self.max_optimizers:
            raise ResourceExhausted(f"name: this server holds its limit of {self.max_optimizers} optimizers")


_EXPONENT_MASKS = {"float16": np.uint16(0x7C00), "bfloat16": np.uint16(0x7F80)}  # all ones: Inf or NaN


def _all_finite(values: np.ndarray) -> bool:
    """No NaN or Inf; half-width floats are judged on their bits (NumPy's bfloat16 isfinite is slow)."""
    mask = _EXPONENT_MASKS.get(values.dtype.name)
    if mask is None:
        return bool(np.isfinite(values).all())
    return not ((values.view(np.uint16) & mask) == mask).any()


def _to_device(grad: Gradient) -> jax.Array | adam.SparseGrad:
    if isinstance(grad, tuple):
        return adam.sparse_grad(*grad)
    return jax.device_put(grad)
