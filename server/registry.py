"""The optimizers a server holds: names, lifecycles, restore and checkpoints.

The registry owns the mapping from names to `Optimizer`s and their folders in
the data dir: a name, its folder and its lifecycle change together.
"""

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optserve.server import overflow
from optserve.server.engine import devices, pipeline
from optserve.server.engine.config import parse_optimizer
from optserve.server.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from optserve.server.metrics import Metrics
from optserve.server.modes import TrainingMode
from optserve.server.optimizer import NON_FINITE_POLICIES, Optimizer
from optserve.server.sharding import Shard, check_create, excluded_from_decay
from optserve.server.storage import OptimizerStore, list_stores

log = logging.getLogger("optserve.registry")


@dataclass(frozen=True)
class Persistence:
    """Where and how a registry keeps its optimizers on disk."""

    data_dir: Path
    durability: str = "wal"  # "wal": log every change before applying it; "none": checkpoints only
    checkpoint_every: int = 1000  # steps between checkpoints
    checkpoint_interval: float = 300.0  # seconds between checkpoints of an optimizer that changed
    accept_log_loss: bool = False  # restore past a damaged or missing log, keeping its rest aside


class Registry:
    """The named optimizers of one server, and their persistence when it has a data dir."""

    def __init__(self, persistence: Persistence | None = None, max_optimizers: int = 1000,
                 metrics: Metrics | None = None, placement: devices.Placement | None = None):
        self.persistence = persistence
        self.placement = placement  # the local devices every optimizer's state is spread over; None: one
        self.max_optimizers = max_optimizers
        self.metrics = metrics or Metrics()
        self._lock = threading.Lock()
        self._optimizers: dict[str, Optimizer] = {}
        self._changing: dict[str, str] = {}  # name -> "create" or "delete" holding it until its folder is done
        self._changed = threading.Condition(self._lock)  # told when a name leaves _changing
        self._ready = persistence is None  # with a data dir: after restore()
        self._checkpointer: threading.Thread | None = None
        self._stop = threading.Event()
        self._checkpoint_due = threading.Event()

    def create(self, name: str, config: Mapping[str, Any], params: Mapping[str, np.ndarray],
               non_finite_policy: str = "refuse", training_mode: TrainingMode = TrainingMode(),
               optimizer_class: str = "", shard: Shard | None = None,
               non_trainable: frozenset[str] = frozenset()) -> Optimizer:
        """Creates an optimizer (and its first checkpoint); ALREADY_EXISTS if the name is taken.

        `optimizer_class` is the tf-keras class ("" : the one a serialized
        `config` names, else Adam); `config` its arguments or serialized form.
        `shard`: the optimizer is that shard of a logical optimizer; `params` are its pieces.

        The name is held from the check until the optimizer is served (or the
        create failed): a create or delete of the same name meanwhile waits.
        """
        if non_finite_policy not in NON_FINITE_POLICIES:
            raise InvalidArgument(f"non_finite_policy: must be one of {NON_FINITE_POLICIES}")
        self._check_ready()
        parsed = parse_optimizer(config, optimizer_class or None)
        excluded = None
        if shard is not None:
            check_create(shard, {tensor: np.shape(values) for tensor, values in params.items()}, parsed,
                         training_mode)
            excluded = excluded_from_decay(parsed, shard)  # on the logical names, not the pieces'
        if non_finite_policy == "refuse":
            for tensor, values in params.items():
                if not overflow.all_finite(np.asarray(values)):
                    raise InvalidArgument(f"tensors[{tensor!r}]: contains NaN or Inf (non_finite_policy 'refuse' "
                                          f"keeps every state value finite)")
        with self._hold(name, "create"):
            with self._lock:
                self._refuse_taken(name)
            store = None
            if self.persistence is not None:
                store = OptimizerStore(self.persistence.data_dir / name, self.persistence.durability)
            state = pipeline.init(params, parsed, devices.layout_for(self.placement, params))
            optimizer = Optimizer(name, parsed, non_finite_policy, training_mode, state, store=store,
                                  on_step=self._note_step, metrics=self.metrics, excluded_from_decay=excluded,
                                  shard=shard, non_trainable=non_trainable)
            if store is not None:
                store.create(optimizer.checkpoint())  # on failure it removes only what it made
            with self._lock:
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
        """Removes an optimizer and its files; NOT_FOUND if there is none.

        The name is held until the folder is renamed away (after a running
        checkpoint ends), so a create of the same name waits for it.
        """
        self._check_ready()
        with self._hold(name, "delete"):
            with self._lock:
                optimizer = self._optimizers.pop(name, None)
            if optimizer is None:
                raise NotFound(f"optimizer {name!r} not found")
            try:
                optimizer.close(delete_files=True)
            except BaseException:
                with self._lock:  # its folder is still there: it is still served
                    self._optimizers[name] = optimizer
                raise
        self.metrics.forget(name)

    @contextlib.contextmanager
    def _hold(self, name: str, change: str) -> Iterator[None]:
        """Holds `name` for one create or delete, waiting while another holds it."""
        with self._changed:
            self._changed.wait_for(lambda: name not in self._changing)
            self._changing[name] = change
        try:
            yield
        finally:
            with self._changed:
                del self._changing[name]
                self._changed.notify_all()

    def restore(self) -> None:
        """Loads every optimizer of the data dir: its newest good checkpoint, then its log replayed.

        Until it returns, every call is answered UNAVAILABLE.
        """
        if self.persistence is None:
            return
        for store in list_stores(self.persistence.data_dir, self.persistence.durability):
            checkpoint, records, lost = store.load(self.persistence.accept_log_loss)
            optimizer = Optimizer.from_checkpoint(checkpoint, store, self.placement, on_step=self._note_step,
                                                  metrics=self.metrics)
            for record in records:
                optimizer.replay(record)
            store.start_log(optimizer.version)
            if lost:  # a checkpoint now, so the next start finds a whole data dir
                try:
                    optimizer.save()
                except (ResourceExhausted, OSError) as err:
                    log.error("optimizer %r: no checkpoint after the accepted log loss: %s", optimizer.name, err)
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

    def save_all(self) -> Sequence[str]:
        """Stops the checkpointer and checkpoints every optimizer (on shutdown): the logs empty.

        A failure is logged and the others are still saved; every optimizer is
        closed. Returns the names of those that could not be saved.
        """
        self._stop.set()
        self._checkpoint_due.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        failed = []
        for optimizer in self.list() if self.persistence is not None else []:
            try:
                version = optimizer.save()
                log.info("saved optimizer %r at version %d", optimizer.name, version)
            except NotFound:
                pass  # deleted meanwhile
            except Exception as err:  # the others are still saved
                log.error("could not save optimizer %r on shutdown (its changes since version %d are %s): %s",
                          optimizer.name, optimizer.saved_version,
                          "in its log" if self.persistence.durability == "wal" else "lost", err)
                failed.append(optimizer.name)
            optimizer.close()
        return failed

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
        """Under the lock and `_hold(name)`: the name is free, and the limit leaves room (other creates count)."""
        if name in self._optimizers:
            raise AlreadyExists(f"name: an optimizer named {name!r} exists already")
        creating = sum(1 for other, change in self._changing.items() if change == "create" and other != name)
        if len(self._optimizers) + creating >= self.max_optimizers:
            raise ResourceExhausted(f"name: this server holds its limit of {self.max_optimizers} optimizers")
