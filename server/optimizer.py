"""One optimizer: its state (any tf-keras class) on the device, and the rules that turn pushes into steps.

Each optimizer applies one change at a time under its own lock, and a pull
copies its tensors under the same lock, so it never sees half of a step.
With a store, every change is logged (and fsynced) before it is applied, so
an acknowledged push survives a crash. Requests arrive here already decoded
and checked.
"""

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import numpy as np

from optserve.server import journal, overflow, parallel, patterns, two_phase
from optserve.server.engine import devices, pipeline
from optserve.server.engine.config import AdamConfig, OptimizerConfig
from optserve.server.errors import (
    Aborted,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from optserve.server.metrics import Metrics
from optserve.server.modes import DedupTable, Gradient, PushResult, RoundGradients, TrainingMode
from optserve.server.push_rate import PushRate
from optserve.server.rounds import SyncRound
from optserve.server.sharding import Shard, ShardNorms, engine_norm_inputs, is_two_phase, round_square_sums
from optserve.server.storage import Checkpoint, LogRecord, OptimizerStore, StorageError
from optserve.server.versions import VersionGate
from optserve.wire.dtypes import FLOAT32
from optserve.wire.layout import ChunkBuffer, FlatLayout, padded_bytes


log = logging.getLogger("optserve.optimizer")

NON_FINITE_POLICIES = ("refuse", "apply")
_INT32_MAX = 2**31 - 1  # the engine's iteration counter saturates here


@dataclass(frozen=True)
class OptimizerInfo:
    """A snapshot of one optimizer's metadata."""

    name: str
    iterations: int
    version: int
    optimizer: str  # the tf-keras class, e.g. "RMSprop"
    slots: list[str]  # the class's slots by tf-keras name, in build order
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    device: str
    non_finite_policy: str
    next_learning_rate: float
    training_mode: TrainingMode
    pending_gradients: int  # sync: gradients in the open round
    saved_version: int  # version of the newest checkpoint; -1 without a data dir
    pushes_per_second: float  # accepted pushes per second over the last push_rate.WINDOW seconds
    last_push_age: float | None  # seconds since the last accepted push; None before the first
    non_trainable: frozenset[str] = frozenset()  # tensors of non-trainable state (see Optimizer)
    shard: Shard | None = None  # its place in a logical optimizer over several servers; None: on its own
    flat_size: int = 0  # elements of each slot's flat buffer, padding included
    tensor_offsets: tuple[int, ...] = ()  # each tensor's first element in it, in creation order
    shards: dict[str, list[tuple[str, int, int]]] | None = None  # pull kind -> (device, start, stop) per shard


class Optimizer:
    """One named optimizer: its state on the device, and the rules that turn pushes into steps."""

    def __init__(self, name: str, config: OptimizerConfig, non_finite_policy: str, training_mode: TrainingMode,
                 state: pipeline.OptimizerState, version: int = 0, store: OptimizerStore | None = None,
                 on_step: Callable[["Optimizer"], None] = lambda optimizer: None, metrics: Metrics | None = None,
                 excluded_from_decay: Collection[str] | None = None, shard: Shard | None = None,
                 non_trainable: Collection[str] = ()):
        self.name = name
        self.shard = shard
        self.config = config
        self.non_finite_policy = non_finite_policy
        self.training_mode = training_mode
        self.layout = pipeline.layout_of(state)  # of every slot, and of the flat gradient a push can arrive in
        self.shapes = dict(self.layout.shapes)
        # Non-trainable state (BatchNorm statistics): never stepped; a push's value for one replaces it after the
        # step (sync: the mean of the round's values), in the weights and the EMA; its moments stay zero.
        self.non_trainable = frozenset(non_trainable)
        self.rounds_closed_by_timeout = 0
        self.saved_version = -1 if store is None else version
        self.saved_at = time.monotonic()
        self._state = state
        # the names weight decay skips: as a checkpoint recorded them, else matched with a time bound
        self._excluded = _excluded_from_decay(config, list(self.shapes), excluded_from_decay)
        decayed = [name for name in self.shapes if name not in self._excluded]
        self._step = pipeline.make_step(config, list(self.shapes), decayed)  # in place: Keras's numbers
        # "refuse": a step that might overflow (see `overflow`) runs on a copy and is refused whole if it does
        self._checked = non_finite_policy == "refuse"
        self._checked_step = pipeline.make_checked_step(config, list(self.shapes), decayed) if self._checked else None
        self._bounds: overflow.Bounds | None = None  # of the state's magnitudes; None: to be measured
        self._bounded = isinstance(config, AdamConfig)  # `overflow` bounds Adam's (and AdamW's) step only
        self._store = store
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()  # one checkpoint at a time, outside the state lock
        self._versions = VersionGate(self._lock, version)
        self._iterations = int(state.iterations)
        self._deleted = False
        self._dedup = DedupTable()
        self._round = SyncRound(training_mode.aggregation, self.layout)  # sync: the round for self._versions.version
        # a sync shard that clips by the whole gradient's norm: rounds are prepared, then committed
        self._two_phase = is_two_phase(config, training_mode, shard)
        self._prepared: two_phase.PreparedRound | None = None
        self._committed: two_phase.CommittedRound | None = None
        self._on_step = on_step  # told after every step, under the lock (it must not block)
        self._metrics = metrics or Metrics()
        self._push_rate = PushRate()

    @property
    def version(self) -> int:
        return self._versions.version

    def push(self, grads: Mapping[str, Gradient], worker_id: str = "", seq: int | None = None,
             base_version: int | None = None, timeout: float | None = None,
             retain: Callable[[], Callable[[], None]] | None = None,
             cancelled: threading.Event | None = None, norms: ShardNorms | None = None,
             measured: Mapping[str, overflow.Magnitude] | None = None) -> PushResult:
        """Accepts one gradient for every tensor, or some (proto `MissingGradients` SKIP); see proto `PushHeader`.

        Async: applies one Adam step now. Sync: adds the gradient to the open
        round and waits (up to `timeout` s) until the round has applied one
        step on the aggregate. Either way the answer comes after the step is
        applied and, with a data dir, logged. A refused push changes nothing.
        `retain()` claims the memory `grads` views beyond this call (a round
        keeps them after a caller that stopped waiting); it returns the
        function that gives it back once the round is applied or dropped.
        A wait ends early with CANCELLED once `cancelled` is set (its gradient
        stays in the round). `norms`: on a shard, the other shards' sums of
        squares of this gradient, for the clip. `measured`: the gradients'
        magnitudes, taken as they were copied in (see `measures`).
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
        if sync and norms is not None:
            raise InvalidArgument("norm_inputs: a sync round clips its combined gradient; its pushes carry none")
        norm_inputs = None if sync else engine_norm_inputs(self.shard, self.config, list(self.shapes), norms)
        self._check_non_trainable(grads)
        magnitudes = self._refuse_non_finite(grads, measured or {})
        with self._lock:
            self._check_alive()
            if seq is not None:
                done = self._dedup.lookup(worker_id, seq)
                if done is not None:
                    self._wait_for(done.version, timeout, "the round of this push", cancelled=cancelled,
                                   prepared=self._two_phase)
                    self._metrics.pushes.labels(self.name, "duplicate").inc()
                    return self._two_phase_answer(replace(done, duplicate=True))
            self._check_base_version(base_version)
            staleness = None if base_version is None else self._versions.version - base_version
            if not sync:
                result = self._apply(grads, [(worker_id, seq)] if seq is not None else [], magnitudes, norms,
                                     norm_inputs)
                if seq is not None:
                    self._dedup.record(worker_id, seq, result)
                self._count_accepted(staleness)
                return result
            if self._prepared is not None:
                raise Aborted(f"base_version: the round for version {self._prepared.version} is closed and waits "
                              f"for its commit (CommitRound); retry the pushes of that round, or commit it")
            generation = self._round.generation  # of the round this gradient joins
            result = self._add_to_round(worker_id, seq, grads, retain, magnitudes)
            self._count_accepted(staleness)
            self._wait_for(result.version, timeout, "the round of this push", generation=generation,
                           cancelled=cancelled, prepared=self._two_phase)
            return self._two_phase_answer(replace(result, iterations=self._iterations))

    def commit_round(self, version: int, norms: ShardNorms) -> PushResult:
        """Applies the prepared two-phase round that makes `version`, clipped with the other shards' `norms`.

        The same commit again is answered (`duplicate`); a different one for
        that round is FAILED_PRECONDITION, as is a commit with no prepared round.
        """
        if not self._two_phase:
            raise FailedPrecondition(f"optimizer: {self.name!r} has no two-phase rounds (only a sync shard that clips "
                                     f"by the whole gradient's norm has)")
        norm_inputs = engine_norm_inputs(self.shard, self.config, list(self.shapes), norms)
        with self._lock:
            self._check_alive()
            committed = self._committed
            if committed is not None and committed.version == version:
                if committed.norms != norms:
                    raise FailedPrecondition(f"norm_inputs: the round for version {version} was committed with "
                                             f"other sums of squares ({committed.norms.to_dict()})")
                return PushResult(version, committed.iterations, duplicate=True, round_square_sums=committed.sums)
            prepared = self._prepared
            if prepared is None or prepared.version != version:
                if version <= self._versions.version:
                    raise FailedPrecondition(f"version: the round for version {version} is applied already and "
                                             f"newer rounds followed (the optimizer is at version {self._versions.version})")
                raise FailedPrecondition(f"version: no round for version {version} is prepared (the optimizer is at "
                                         f"version {self._versions.version}); push the round's gradients first")
            try:
                result = self._apply(prepared.grads, prepared.workers, prepared.magnitudes, norms, norm_inputs,
                                     prepared.sums, prepared.values)
            except (ResourceExhausted, InvalidArgument):
                for worker_id, seq in prepared.workers:  # every push of the round is refused; retries start over
                    self._dedup.forget(worker_id, seq)
                raise
            finally:
                self._prepared = None
                self._versions.notify()
            self._committed = two_phase.CommittedRound(version, norms, prepared.sums, result.iterations)
            return replace(result, round_square_sums=prepared.sums)

    def _two_phase_answer(self, result: PushResult) -> PushResult:
        """Under the lock: a sync push's answer, with its round's sums of squares when the round is two-phase."""
        return two_phase.answer(result, self._prepared, self._committed, self._versions.version,
                                min(self._iterations + 1, _INT32_MAX))

    def pull(self, kind: str, names: Sequence[str], min_version: int | None = None, timeout: float | None = None,
             into: Callable[[int], np.ndarray] | None = None,
             cancelled: threading.Event | None = None) -> tuple[int, int, list[tuple[str, np.ndarray]]]:
        """Copies one kind of state tensor out as one snapshot: "weights", "ema" or a slot by tf-keras name.

        Waits (on a condition, not by polling) up to `timeout` seconds for
        `min_version`, or until `cancelled` is set (CANCELLED). Returns
        (version, iterations, [(name, float32 array)]);
        `names` empty means every tensor in creation order. `into(nbytes)`
        supplies an aligned buffer to copy into (a warm one from a pool); else
        fresh arrays are made.
        """
        if kind == "ema" and not self.config.use_ema:
            raise FailedPrecondition(f"kind: optimizer {self.name!r} keeps no EMA weights (use_ema is false)")
        if kind == "vhat" and isinstance(self.config, AdamConfig) and not self.config.amsgrad:
            raise FailedPrecondition(f"kind: optimizer {self.name!r} keeps no vhat (amsgrad is false)")
        if kind not in ("weights", "ema") and kind not in self._state.slots:
            raise FailedPrecondition(f"slot: optimizer {self.name!r} ({self.config.class_name}) has no slot {kind!r}; "
                                     f"its slots are {list(self._state.slots)}")
        layout = self.layout if kind in ("weights", "ema") else self._state.slots[kind].layout
        names = list(names) or list(layout.shapes)
        for name in names:
            if name not in self.shapes:
                raise NotFound(f"names[{name!r}]: optimizer {self.name!r} has no tensor {name!r}")
            if name not in layout.shapes:
                raise InvalidArgument(f"names[{name!r}]: slot {kind!r} exists for tensors of rank >= 2 only")
        if len(set(names)) != len(names):
            raise InvalidArgument("names: a tensor is named twice")
        with self._lock:
            if min_version is not None:
                self._wait_for(min_version, timeout, "min_version", cancelled=cancelled)
            self._check_alive()
            tensors = {"weights": self._state.params, "ema": self._state.ema}.get(kind) or self._state.slots[kind]
            source = np.asarray(tensors.flat)  # on the CPU: no copy
            return self._versions.version, self._iterations, self._copy_out(source, layout, names, into)

    @staticmethod
    def _copy_out(source: np.ndarray, layout: FlatLayout, names: list[str], into: Callable[[int], np.ndarray] | None,
                  ) -> list[tuple[str, np.ndarray]]:
        """The tensors `names` of a flat slot in `layout`, copied once: into fresh arrays, or into `into`'s buffer.

        `into`'s buffer holds the tensors as a ChunkBuffer lays them out in the
        order of `names`; for every tensor in creation order that is the flat
        layout itself, so the whole slot is one copy.
        """
        views = layout.views(source, names)
        if into is None:
            return [(name, np.array(views[name])) for name in names]
        sizes = [4 * layout.sizes[name] for name in names]
        buffer = into(padded_bytes(sizes))
        if names == list(layout.shapes) and layout.packed:
            flat = buffer[:layout.nbytes].view(np.float32)
            parallel.copy(flat, source)  # split across the free cores: a pull's copy is under the lock
            return list(layout.views(flat).items())
        slots = ChunkBuffer(sizes, InvalidArgument, buffer)
        arrays = []
        for index, name in enumerate(names):
            array = slots.view(index, FLOAT32, layout.shapes[name])
            np.copyto(array, views[name])
            arrays.append((name, array))
        return arrays

    def finalize(self) -> None:
        """Copies the EMA into the weights (Keras `finalize_variable_values`)."""
        with self._lock:
            self._check_alive()
            if self.config.use_ema:
                self._log(LogRecord("finalize", self._versions.version + 1))
                self._state = pipeline.finalize(self._state)
                self._bounds = None
                self._versions.bump()

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
                self._state = pipeline.finalize(self._state)
                self._bounds = None
                self._versions.bump()
            else:
                self._step_with(record.grads, record.norms)
                if record.round_square_sums is not None:
                    self._committed = two_phase.CommittedRound(record.version, record.norms,
                                                               record.round_square_sums, self._iterations)
            for worker_id, seq in record.workers:
                self._dedup.record(worker_id, seq, PushResult(self._versions.version, self._iterations))

    def info(self) -> OptimizerInfo:
        """The optimizer's metadata as of now."""
        with self._lock:
            version, iterations, pending = self._versions.version, self._iterations, len(self._round)
            tensors = {"weights": self._state.params, "ema": self._state.ema, **self._state.slots}
            shards = {kind: devices.shards(t.flat) for kind, t in tensors.items() if t is not None}
            pushes_per_second, last_push_age = self._push_rate.per_second(), self._push_rate.last_age()
        return OptimizerInfo(
            name=self.name,
            iterations=iterations,
            version=version,
            optimizer=self.config.class_name,
            slots=list(self._state.slots),
            config=self.config.to_keras_dict(),
            shapes=dict(self.shapes),
            device=",".join(sorted({device for device, _, _ in shards["weights"]}, key=_device_order)),
            non_finite_policy=self.non_finite_policy,
            next_learning_rate=pipeline.learning_rate_at(self.config, iterations),
            training_mode=self.training_mode,
            pending_gradients=pending,
            saved_version=self.saved_version,
            pushes_per_second=pushes_per_second,
            last_push_age=last_push_age,
            non_trainable=self.non_trainable,
            shard=self.shard,
            flat_size=self.layout.size,
            tensor_offsets=tuple(self.layout.offsets.values()),
            shards=shards,
        )

    def close(self, delete_files: bool = False) -> None:
        """Marks the optimizer deleted: calls that hold it fail, waiting calls wake up.

        With `delete_files`, the folder goes first: if that fails, the optimizer is left as it was.
        """
        with self._save_lock, self._lock:
            if self._store is not None:
                self._store.delete() if delete_files else self._store.close()
            self._deleted = True
            self._prepared = None
            self._round.close()
            self._versions.notify()


    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, store: OptimizerStore,
                        placement: devices.Placement | None = None, **hooks: Any) -> "Optimizer":
        """The optimizer a checkpoint describes; its later log records are replayed with `replay`.

        `placement` spreads the state over a server's devices (None: jax's default device).
        """
        try:
            contents = journal.contents_of(checkpoint, placement)
            optimizer = cls(contents.name, contents.config, contents.non_finite_policy, contents.training_mode,
                            contents.state, contents.version, store, excluded_from_decay=contents.excluded_from_decay,
                            shard=contents.shard, non_trainable=contents.non_trainable, **hooks)
        except InvalidArgument as err:  # a checkpoint without the matched names, whose pattern now runs out of time
            raise StorageError(f"{store.directory}: cannot restore optimizer {checkpoint.meta['name']!r}: {err}"
                               ) from None
        optimizer._dedup.load_json(contents.dedup)
        if contents.committed_round:  # so a repeated commit after a restart is still checked and answered
            optimizer._committed = two_phase.CommittedRound.from_dict(contents.committed_round)
        return optimizer

    def checkpoint(self) -> Checkpoint:
        """The complete state as of now, as a checkpoint holds it (under the lock, or before it is shared)."""
        return journal.checkpoint_of(journal.Contents(
            self.name, self.config, self.non_finite_policy, self.training_mode, self._state, self._iterations,
            self._versions.version, self._dedup.to_json(), sorted(self._excluded), tuple(sorted(self.non_trainable)),
            self.shard, None if self._committed is None else self._committed.to_dict()))

    def _count_accepted(self, staleness: int | None) -> None:
        self._push_rate.accepted()
        self._metrics.pushes.labels(self.name, "accepted").inc()
        if staleness is not None:
            self._metrics.staleness.labels(self.name).observe(staleness)

    @property
    def measures(self) -> tuple[bool, bool]:
        """Whether a push's gradients are measured (`overflow.magnitude`), and with their sums of squares."""
        return self.non_finite_policy == "refuse" or self._metrics.enabled, self._metrics.enabled

    def _refuse_non_finite(self, grads: Mapping[str, Gradient],
                           measured: Mapping[str, overflow.Magnitude]) -> list[overflow.Magnitude] | None:
        """The gradients' magnitudes (`measured`, else taken here, outside the lock), after refusing NaN or Inf
        under "refuse"; None when neither the policy nor the metrics need them."""
        wanted, squares = self.measures
        if not wanted:
            return None
        magnitudes = []
        for name, grad in grads.items():
            magnitudes.append(measured.get(name) or overflow.magnitude(grad, squares))
            if self.non_finite_policy == "refuse" and not np.isfinite(magnitudes[-1].largest):
                raise InvalidArgument(
                    f"gradients[{name!r}]: contains NaN or Inf (this optimizer's non_finite_policy is 'refuse')")
        return magnitudes

    def _check_base_version(self, base_version: int | None) -> None:
        if base_version is None:
            return
        if base_version > self._versions.version:
            raise InvalidArgument(f"base_version: {base_version} is ahead of the current version {self._versions.version}")
        if self.training_mode.mode == "sync" and base_version < self._versions.version:
            raise Aborted(f"base_version: the round for version {base_version} is closed; the optimizer is at "
                          f"version {self._versions.version}: pull and push for that round")
        limit = self.training_mode.max_staleness
        if limit is not None and self._versions.version - base_version > limit:
            raise Aborted(f"base_version: {base_version} is {self._versions.version - base_version} versions behind the "
                          f"current version {self._versions.version} (max_staleness {limit}): pull and recompute")

    def wake_waiters(self) -> None:
        """Wakes every waiting call, so that one whose `cancelled` event is set stops waiting."""
        with self._lock:
            self._versions.notify()

    def _wait_for(self, version: int, timeout: float | None, what: str, *, generation: int | None = None,
                  cancelled: threading.Event | None = None, prepared: bool = False) -> None:
        """Waits, under the lock, until the optimizer reaches `version`, the round for it is dropped, or
        `cancelled` is set.

        `generation`: the round a sync push joined; a later round for the same version (its
        retries) does not count as dropped for it.
        """
        def dropped() -> bool:
            return self._round.was_dropped(version, generation)

        def ended() -> bool:
            return cancelled is not None and cancelled.is_set()

        def is_prepared() -> bool:  # `prepared`: a two-phase round closed for `version` also ends the wait
            return prepared and self._prepared is not None and self._prepared.version == version

        reached = self._versions.wait(version, timeout, lambda: self._deleted or dropped() or ended() or is_prepared())
        self._check_alive()
        if is_prepared():
            return
        if self._versions.version < version and ended():
            raise Cancelled(f"{what}: the call ended (cancelled, or its client went away) while waiting for "
                            f"version {version}")
        if self._versions.version < version and dropped():
            error = self._round.dropped_error
            raise type(error)(f"{what}: the round for version {version} was dropped: {error}")
        if not reached:
            raise DeadlineExceeded(f"{what}: optimizer {self.name!r} is at version {self._versions.version}, "
                                   f"not yet {version}, after {timeout:.3g} s")

    def _apply(self, grads: Mapping[str, Gradient], workers: list[tuple[str, int]],
               magnitudes: list[overflow.Magnitude] | None = None, norms: ShardNorms | None = None,
               norm_inputs: pipeline.NormInputs | None = None, round_sums: ShardNorms | None = None,
               values: Mapping[str, np.ndarray] | None = None) -> PushResult:
        """Logs, then applies, one step, under the lock.

        Under "refuse", a step that `overflow` cannot prove finite from the
        gradients' `magnitudes` (it bounds Adam's and AdamW's only: every other
        class's step is) is computed first, on a copy of the state, and
        refused if it leaves any value non-finite; then logged, then kept. So a
        refused step, or a log write that fails, changes nothing. The
        non-trainable tensors then take their `values` (default: those `grads`
        carries), logged with the step.
        """
        started = time.perf_counter()
        values = self._values_in(grads) if values is None else values
        record = LogRecord("step", self._versions.version + 1, workers, {**dict(grads), **values}, norms, round_sums)
        bounds = None
        if self._checked and self._bounded:
            if self._bounds is None:
                self._bounds = overflow.bounds_of(self._state)
            bounds = overflow.next_bounds(self.config, self._iterations, self._bounds, magnitudes or [])
        if self._checked and bounds is None:
            state = self._checked_state(grads, norm_inputs, magnitudes)
            self._log(record)
            bounds = overflow.bounds_of(state) if self._bounded else None
        else:
            self._log(record)
            state = self._step(self._state, self._device_grads(grads, magnitudes), norm_inputs)
        self._commit(self._assigned(state, values), grads, started, magnitudes)
        self._bounds = bounds if not values else None  # assigned values: measured again before the next step
        return PushResult(self._versions.version, self._iterations)

    def _check_non_trainable(self, grads: Mapping[str, Gradient]) -> None:
        """A push's value of a non-trainable tensor is dense, and a push carries some trainable gradient."""
        for name in self.non_trainable:
            if isinstance(grads.get(name), tuple):
                raise InvalidArgument(f"gradients[{name!r}]: a non-trainable tensor takes a dense value, not rows")
        if all(name in self.non_trainable for name in grads):
            raise InvalidArgument("gradients: only non-trainable values; a push carries a gradient of at least one "
                                  "trainable tensor")

    def _values_in(self, grads: Mapping[str, Gradient]) -> dict[str, np.ndarray]:
        """The values of non-trainable tensors a push (or a logged step) carries."""
        return {name: np.asarray(grads[name], np.float32) for name in sorted(self.non_trainable) if name in grads}

    def _assigned(self, state: pipeline.OptimizerState, values: Mapping[str, np.ndarray]) -> pipeline.OptimizerState:
        """`state` with the non-trainable tensors' new values in the weights (and the EMA, which serves them too)."""
        if not values:
            return state
        return state._replace(params=pipeline.assign(state.params, values),
                              ema=None if state.ema is None else pipeline.assign(state.ema, values))

    def _checked_state(self, grads: Mapping[str, Gradient], norm_inputs: pipeline.NormInputs | None = None,
                       magnitudes: list[overflow.Magnitude] | None = None) -> pipeline.OptimizerState:
        """The state after a step, computed beside the current one; INVALID_ARGUMENT if any value is non-finite."""
        state, finite = self._checked_step(self._state, self._device_grads(grads, magnitudes), norm_inputs)
        finite = np.asarray(finite)
        if not finite.all():
            bad = [name for name, ok in zip(self.shapes, finite) if not ok]
            raise InvalidArgument(
                f"gradients[{bad[0]!r}]: this step would make the optimizer's state non-finite (NaN or Inf in the "
                f"weights or moments of {len(bad)} of {len(finite)} tensors); non_finite_policy 'refuse' keeps "
                f"the state as it was")
        return state

    def _device_grads(self, grads: Mapping[str, Gradient],
                      magnitudes: list[overflow.Magnitude] | None = None) -> pipeline.FlatGrads:
        """Every tensor's gradient as the step takes it: the dense ones in one flat buffer (no copy when the
        push arrived in `self.layout`), the sparse ones padded to their bucket; under "refuse", with their limits."""
        if isinstance(grads, RoundGradients):  # a sync round's sum: already one flat device buffer
            present = grads.present
            if self.non_trainable:  # their values are assigned, never stepped
                present = frozenset(grads.present if present is not None else self.shapes) - self.non_trainable
            return pipeline.FlatGrads(grads.flat, {name: pipeline.sparse_grad(*g) for name, g in grads.sparse.items()},
                                      present, self._limits(grads, None))
        # a push with missing SKIP carries some tensors only: the step leaves the others as they are
        flat = pipeline.flat_grads(self.layout, {name: _to_device(grads[name]) for name in self.shapes
                                                 if name in grads and name not in self.non_trainable})
        return flat._replace(limits=self._limits(grads, magnitudes))

    def _limits(self, grads: Mapping[str, Gradient], magnitudes: list[overflow.Magnitude] | None) -> np.ndarray | None:
        """Under "refuse", each tensor's largest |g| as measured before the step (inf where none was: a round's
        sum, a logged step). The step reads any value past it as 0, so bytes changed after the measure cannot
        take the state past what was proved finite; an honest gradient steps bit for bit as without limits.
        Passed on every step under "refuse", so that all of them run one compiled step."""
        if not self._checked:
            return None
        limits = np.full(len(self.layout.shapes), np.inf, np.float32)
        if magnitudes is not None and len(magnitudes) == len(grads):
            index = {name: i for i, name in enumerate(self.layout.shapes)}
            for name, magnitude in zip(grads, magnitudes):
                limits[index[name]] = magnitude.largest
        return limits

    @property
    def reads_segments_in_place(self) -> bool:
        """Whether a same-host push's step may read the client's segment itself, not a private copy of it.

        Only where nothing outlives the push's step: async (a sync round keeps
        its gradients past the push), no write-ahead log (its record must be
        the bytes the step read) and no non-trainable tensors (their values are
        assigned as they are). The client may still change the bytes: the
        checks measure them, and the step's limits (`_limits`) hold it to what
        was measured.
        """
        return self._store is None and self.training_mode.mode == "async" and not self.non_trainable

    def _step_with(self, grads: Mapping[str, Gradient], norms: ShardNorms | None = None) -> None:
        """Re-applies a logged (so acknowledged) step as it was applied then."""
        started = time.perf_counter()
        self._bounds = None
        norm_inputs = None if norms is None else engine_norm_inputs(self.shard, self.config, list(self.shapes), norms)
        self._commit(self._assigned(self._step(self._state, self._device_grads(grads), norm_inputs),
                                    self._values_in(grads)), grads, started)

    def _commit(self, state: pipeline.OptimizerState, grads: Mapping[str, Gradient], started: float,
                magnitudes: list[overflow.Magnitude] | None = None) -> None:
        """Makes `state` the optimizer's state: one more step and version."""
        self._state = state
        jax.block_until_ready(self._state)
        self._iterations = min(self._iterations + 1, _INT32_MAX)
        self._versions.bump()
        stepped = grads if not self.non_trainable else {n: g for n, g in grads.items() if n not in self.non_trainable}
        squares = None  # the stepped gradients' sum of squares, when measured before the lock; else the metrics sum
        if magnitudes is not None and len(magnitudes) == len(grads) and all(m.squares is not None for m in magnitudes):
            squares = sum(m.squares for name, m in zip(grads, magnitudes) if name in stepped)
        self._metrics.observe_step(self.name, time.perf_counter() - started, self._versions.version, stepped, squares)
        self._on_step(self)

    def _log(self, record: LogRecord) -> None:
        if self._store is not None:
            self._store.append(record)

    def _add_to_round(self, worker_id: str, seq: int | None, grads: Mapping[str, Gradient],
                      retain: Callable[[], Callable[[], None]] | None = None,
                      magnitudes: list[overflow.Magnitude] | None = None) -> PushResult:
        """Sync mode, under the lock: one worker's gradient joins the open round (which holds its memory)."""
        self._round.add(worker_id, seq, grads, self._versions.version, retain, magnitudes)
        result = PushResult(self._versions.version + 1, self._iterations)
        if seq is not None:
            self._dedup.record(worker_id, seq, result)
        if len(self._round) >= self.training_mode.num_workers:
            self._close_round()
        elif self.shard is None or self.shard.placement.count == 1:
            self._round.start_timer(self.training_mode.sync_timeout, self._close_round_on_timeout, self._versions.version)
        # one shard of several closes a round only when it is full: a straggler timeout would let each shard
        # close it with its own subset of the workers, and the model would be stepped with different gradients
        return result

    def _close_round(self) -> None:
        """Applies one step on the round's aggregate, under the lock."""
        self._round.cancel_timer()
        workers = self._round.sequenced()
        try:
            combined, magnitudes = self._round.combine()
            values = self._round.means(self.non_trainable, self.shapes)
            if self._two_phase:  # its commit applies it, with the other shards' sums of squares
                self._prepared = two_phase.PreparedRound(self._versions.version + 1, combined, workers, magnitudes,
                                                         round_square_sums(self.shard, combined), values)
            else:
                self._apply(combined, workers, magnitudes, values=values)
        except (ResourceExhausted, InvalidArgument) as err:
            # the log is full, or the aggregate step would make the state non-finite: every push of the
            # round is refused with that error, and retries start over
            for worker_id, seq in workers:
                self._dedup.forget(worker_id, seq)
            self._round.drop(self._versions.version + 1, err)
            raise
        finally:
            self._round.close()
            self._versions.notify()

    def _close_round_on_timeout(self, round_version: int) -> None:
        with self._lock:
            if self._deleted or self._versions.version != round_version or not len(self._round):
                return
            log.warning("optimizer %r: sync round for version %d closed by timeout after %.3g s with %d of %d "
                        "gradients (workers %s)", self.name, round_version + 1, self.training_mode.sync_timeout,
                        len(self._round), self.training_mode.num_workers, self._round.workers())
            self.rounds_closed_by_timeout += 1
            self._metrics.rounds_timed_out.labels(self.name).inc()
            self._round.timer_fired()
            try:
                self._close_round()
            except (ResourceExhausted, InvalidArgument) as err:
                log.error("optimizer %r: sync round for version %d dropped: %s", self.name, round_version + 1, err)

    def _check_alive(self) -> None:
        if self._deleted:
            raise NotFound(f"optimizer {self.name!r} was deleted")


def _excluded_from_decay(config: OptimizerConfig, names: list[str], known: Collection[str] | None) -> frozenset[str]:
    """The tensors weight decay skips: `known` (from a checkpoint), else matched by `patterns` with a time bound."""
    if config.weight_decay is None or not config.exclude_from_weight_decay:
        return frozenset()
    if known is not None:
        return frozenset(known) & frozenset(names)
    return patterns.excluded_names(config.exclude_from_weight_decay, names)


def _device_order(device: str) -> tuple[str, int]:
    platform, _, index = device.partition(":")
    return platform, int(index or 0)


def _to_device(grad: Gradient | jax.Array) -> np.ndarray | jax.Array | pipeline.SparseGrad:
    """A sparse gradient padded onto the device; a dense one as it is (`pipeline.flat_grads` lays it out)."""
    if isinstance(grad, tuple):
        return pipeline.sparse_grad(*grad)
    return grad

