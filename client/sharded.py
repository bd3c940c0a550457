"""One logical optimizer over several servers (shards), with the API of a one-server client.

`ShardedClient` holds one ordinary `Client` per shard. Creating an optimizer
places its tensors (`optserve.wire.placement`: whole by size, large ones cut
by rows) and creates on each shard an ordinary optimizer holding its pieces,
with the whole table recorded beside it; opening one reads the table back
from every shard and refuses an address list that disagrees. A push is cut
into per-shard pushes sent in parallel; a pull gathers the pieces back.

Versions: each shard counts its own. The logical version is the smallest
shard version (every push reaches every shard, so it counts the pushes that
every shard has applied); in sync mode the shards move together and a pull
returns every shard's tensors from one round.
"""

import math
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from optserve.client import trees
from optserve.client.arrays import sparse_rows, to_numpy
from optserve.client.client import (
    _PUSH_RETRY,
    _SLOTS,
    Client,
    IndexedSlices,
    Optimizer,
    OptimizerInfo,
    PushResult,
    _as_float32,
    _wire_values,
)
from optserve.client.errors import InvalidArgumentError, OptserveError
from optserve.client.weights import Weights
from optserve.v1 import optserve_pb2 as pb
from optserve.wire import placement as placements
from optserve.wire.dtypes import FLOAT32
from optserve.wire.layout import ChunkBuffer
from optserve.wire.placement import DEFAULT_MAX_SHARD_BYTES, Piece, Placement

SYNC_PULL_TRIES = 8  # sync: pulls of lagging shards at most, before a pull gives up finding one round on all
COMMIT_TRIES = 3  # two-phase sync rounds: commits of one push at most (a restarted shard needs its push again)
_NOT_FOUND = grpc.StatusCode.NOT_FOUND


def resolve(target: str | Sequence[str]) -> list[str]:
    """The shard addresses of `target`: a list as given, or every A/AAAA record of "dns:///host:port", sorted."""
    if not isinstance(target, str):
        addresses = list(target)
        if not addresses or not all(isinstance(a, str) and a for a in addresses):
            raise InvalidArgumentError(f"address: a list of shard addresses must hold non-empty strings, got "
                                       f"{target!r}")
        if len(set(addresses)) != len(addresses):
            raise InvalidArgumentError(f"address: a shard address is listed twice in {addresses}")
        return addresses
    host, _, port = target.removeprefix("dns:///").rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgumentError(f"address: must be dns:///HOST:PORT, got {target!r}")
    try:
        records = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise OptserveError(grpc.StatusCode.UNAVAILABLE, f"address: cannot resolve {host!r}: {err}") from None
    ips = sorted({record[4][0] for record in records})
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]


class ShardedClient:
    """Connections to the shards of logical optimizers: `addresses` in shard order, or a "dns:///" name.

    Takes the keyword arguments of `Client` (timeout, tls, token, transport,
    chunk_bytes), applied to each shard. A list gives the shard order: an
    optimizer created through it puts shard i on address i, and opening one
    refuses a list in another order. A DNS name (a headless Service) gives
    the addresses only: creates order them sorted, opens by the shard index
    each server reports.
    """

    def __init__(self, address: str | Sequence[str], timeout: float = 30.0, **options: Any):
        self.addresses = resolve(address)
        self.address = address if isinstance(address, str) else ",".join(self.addresses)
        self.timeout = timeout
        self._ordered_by_name = isinstance(address, str)  # dns: the servers' shard indices give the order
        # Calls to the shards run in parallel threads; a sync push waits there for its round, so the
        # pool is large (its threads start only as calls need them).
        self._pool = futures.ThreadPoolExecutor(max_workers=64 + 16 * len(self.addresses),
                                                thread_name_prefix="optserve-shards")
        outcomes = self._try_each(lambda a: Client(a, timeout, **options), self.addresses)
        self.shards: list[Client] = [client for ok, client in outcomes if ok]
        failed = [(address, err) for address, (ok, err) in zip(self.addresses, outcomes) if not ok]
        if failed:
            self.close()
            raise failed[0][1]

    def create_optimizer(
        self, name: str, params: Mapping[str, Any], config: Mapping[str, Any] | None = None, *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, **settings: Any,
    ) -> "ShardedOptimizer":
        """Places `params` over the shards and creates each shard's part; see `Client.create_optimizer`.

        A tensor over `max_shard_bytes` (default 4 MiB) is split by rows. If a
        shard refuses, the parts already created are deleted again and the
        error names that shard.
        """
        for setting in ("state", "if_exists"):
            if settings.get(setting) not in (None, "refuse"):
                raise InvalidArgumentError(f"{setting}: not supported by a sharded client yet (one server only)")
        arrays = {key: _as_float32(value, f"params[{key!r}]") for key, value in trees.flatten(params, "params").items()}
        try:
            table = placements.place({key: a.shape for key, a in arrays.items()}, len(self.shards), max_shard_bytes)
        except ValueError as err:
            raise InvalidArgumentError(str(err)) from None

        def create(index: int) -> Optimizer:
            pieces = table.of_shard(index)
            part = {piece.name: arrays[piece.tensor][piece.start:piece.stop] if piece.tensor_shape
                    else arrays[piece.tensor] for piece in pieces}
            shard = None if table.count == 1 else _shard_to_wire(index, table)
            return self.shards[index].create_optimizer(name, part, config, shard=shard, **settings)

        outcomes = self._try_each(create, range(len(self.shards)))
        failed = [(i, err) for i, (ok, err) in enumerate(outcomes) if not ok]
        if failed:
            for index, (ok, _) in enumerate(outcomes):
                if ok:
                    try:
                        self.shards[index].delete_optimizer(name)
                    except OptserveError:
                        pass  # reported below with the failure that made it necessary
            index, err = failed[0]
            raise OptserveError(err.code(), f"shard {index} ({self.addresses[index]}): {err.details()}")
        return ShardedOptimizer(self, name, table, [handle for _, handle in outcomes])

    def optimizer(self, name: str) -> "ShardedOptimizer":
        """The logical optimizer `name`, its placement read from every shard and checked against this client.

        NOT_FOUND if no shard has it; FAILED_PRECONDITION naming the address
        when a shard lacks it, holds another table, or sits at another place
        in the address list than the one it was created at.
        """
        infos = self._try_each(lambda client: client.optimizer(name).info(), self.shards)
        missing = [i for i, (ok, err) in enumerate(infos) if not ok and err.code() == _NOT_FOUND]
        for index, (ok, err) in enumerate(infos):
            if not ok and err.code() != _NOT_FOUND:
                raise OptserveError(err.code(), f"shard {index} ({self.addresses[index]}): {err.details()}")
        if len(missing) == len(self.shards):
            raise OptserveError(_NOT_FOUND, f"optimizer {name!r} not found on any of {self.addresses}")
        if missing:
            raise OptserveError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"address {self.addresses[missing[0]]}: holds no optimizer {name!r}, which the other "
                                f"addresses hold: it is not a shard of it (wrong address list?)")
        order, table = self._check_placement(name, [info for _, info in infos])
        if order != list(range(len(self.shards))):  # a DNS name: shard order from the servers
            self.shards = [self.shards[i] for i in order]
            self.addresses = [self.addresses[i] for i in order]
        return ShardedOptimizer(self, name, table, [Optimizer(client, name) for client in self.shards])

    def _check_placement(self, name: str, infos: list[OptimizerInfo]) -> tuple[list[int], Placement]:
        """Which server holds each shard, and the table; FAILED_PRECONDITION naming an address that disagrees."""
        count = len(self.shards)
        if count == 1 and infos[0].shard is None:
            return [0], placements.place({k: shape for k, (shape, _) in infos[0].tensors.items()}, 1)
        order = [-1] * count
        first = None
        for position, (address, info) in enumerate(zip(self.addresses, infos)):
            shard = info.shard
            if shard is None:
                raise OptserveError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"address {address}: holds optimizer {name!r} as a one-server optimizer, not as "
                                    f"a shard of {count}")
            holds = f"address {address}: holds shard {shard['index']} of {shard['count']} of optimizer {name!r} " \
                    f"(placement {shard['digest'][:12]})"
            if shard["count"] != count:
                raise OptserveError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"{holds}, but this client lists {count} addresses")
            if first is None:
                first = shard
            elif shard["digest"] != first["digest"]:
                raise OptserveError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"{holds}, but {self.addresses[0]} holds placement {first['digest'][:12]}: "
                                    f"they are not shards of one optimizer")
            if not self._ordered_by_name and shard["index"] != position:
                raise OptserveError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"{holds}, but is address {position} in this client's list: list the shards "
                                    f"in their order")
            if order[shard["index"]] != -1:
                raise OptserveError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"{holds}, as does address {self.addresses[order[shard['index']]]}")
            order[shard["index"]] = position
        table = Placement(first["count"], first["max_shard_bytes"],
                          tuple(Piece(n, t, s, a, b, tuple(shape)) for n, t, s, a, b, shape in first["pieces"]))
        return order, table

    def list_optimizers(self) -> list[OptimizerInfo]:
        """Every logical optimizer that all the shards hold, sorted by name (each as `ShardedOptimizer.info`)."""
        found = []
        for info in self.shards[0].list_optimizers():
            try:
                found.append(self.optimizer(info.name).info())
            except OptserveError as err:
                if err.code() not in (_NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    raise
        return found

    def delete_optimizer(self, name: str) -> None:
        """Deletes the optimizer on every shard; NOT_FOUND if no shard had it."""
        outcomes = self._try_each(lambda client: client.delete_optimizer(name), self.shards)
        errors = [(i, err) for i, (ok, err) in enumerate(outcomes) if not ok]
        if len(errors) == len(self.shards) and all(err.code() == _NOT_FOUND for _, err in errors):
            raise OptserveError(_NOT_FOUND, f"optimizer {name!r} not found on any of {self.addresses}")
        for index, err in errors:
            if err.code() != _NOT_FOUND:
                raise OptserveError(err.code(), f"shard {index} ({self.addresses[index]}): {err.details()}; the "
                                                f"other shards deleted their part")

    def close(self) -> None:
        """Closes every shard's connection."""
        for client in self.shards:
            client.close()
        self._pool.shutdown(wait=False)

    def __enter__(self) -> "ShardedClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _each(self, call: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """`call(item)` for every item in parallel; the results in order, or the first item's error."""
        outcomes = self._try_each(call, items)
        for ok, value in outcomes:
            if not ok:
                raise value
        return [value for _, value in outcomes]

    def _try_each(self, call: Callable[[Any], Any], items: Iterable[Any]) -> list[tuple[bool, Any]]:
        """(True, result) or (False, OptserveError) per item, from `call(item)` run in parallel."""
        calls = [self._pool.submit(call, item) for item in items]
        outcomes = []
        for done in calls:
            try:
                outcomes.append((True, done.result()))
            except OptserveError as err:
                outcomes.append((False, err))
        return outcomes


class ShardedOptimizer:
    """A handle to one logical optimizer over the shards of a `ShardedClient`; the API of `Optimizer`."""

    def __init__(self, client: ShardedClient, name: str, table: Placement, parts: list[Optimizer]):
        self.client = client
        self.name = name
        self.placement = table
        self._parts = parts
        self._tensors = table.tensors
        self._pieces = {piece.name: piece for piece in table.pieces}
        info = parts[0].info()
        self._sync = info.training_mode["mode"] == "sync"
        self._refuse_non_finite = info.non_finite_policy == "refuse"
        config = info.config
        self._clip = None if table.count == 1 else "clipnorm" if config.get("clipnorm") is not None else \
            "global_clipnorm" if config.get("global_clipnorm") is not None else None
        self._lock = threading.Lock()

    def push(self, grads: Mapping[str, Any], *, worker_id: str = "", seq: int | None = None,
             base_version: int | None = None, wire_dtype: str | None = None, missing: str = "refuse") -> PushResult:
        """Sends each shard its rows of every gradient, in parallel; see `Optimizer.push`.

        Returns the logical version that includes the push (the largest of the
        shards' answers: once every shard reaches it, all include it), with
        `.versions`, each shard's. If some shards applied it and others did
        not, OptserveError says which; with `worker_id` and `seq` the same push
        again completes it (the shards that have it answer `duplicate`).
        `base_version` is a logical version; each shard checks it against its own.
        """
        if missing not in ("refuse", "skip"):
            raise InvalidArgumentError(f"missing: must be one of ['refuse', 'skip'], got {missing!r}")
        grads = _dense_or_rows(grads, missing == "skip")
        parts = self._split(grads, missing == "skip")
        if self._refuse_non_finite:  # refused here, or the shards without the NaN would apply the push
            for name, grad in grads.items():
                values = np.asarray(grad.values if isinstance(grad, IndexedSlices) else grad)
                if values.dtype.kind == "f" and not np.isfinite(values).all():
                    raise InvalidArgumentError(f"gradients[{name!r}]: contains NaN or Inf (this optimizer's "
                                               f"non_finite_policy is 'refuse')")
        norms = self._norm_inputs(parts, wire_dtype) if self._clip else [None] * len(parts)

        def send(index: int, base: int | None = base_version) -> PushResult:
            return self._parts[index].push(parts[index], worker_id=worker_id, seq=seq, base_version=base,
                                           wire_dtype=wire_dtype, missing=missing, norm_inputs=norms[index])

        outcomes = self.client._try_each(send, range(len(parts)))
        failed = [(i, err) for i, (ok, err) in enumerate(outcomes) if not ok]
        if failed and not self._sync and len(failed) < len(parts) and all(_judged_by_version(e) for _, e in failed):
            outcomes = self._complete_stale(outcomes, failed, send)
            failed = [(i, err) for i, (ok, err) in enumerate(outcomes) if not ok]
        if failed:
            raise self._push_error(outcomes, failed, worker_id, seq)
        results = [result for _, result in outcomes]
        for _ in range(COMMIT_TRIES):
            if not any(result.prepared for result in results):
                break
            results = self._commit(results, lambda index: send(index), worker_id, seq)
        return _combined_result(results)

    def _commit(self, results: list[PushResult], send: Callable[[int], PushResult], worker_id: str,
                seq: int | None) -> list[PushResult]:
        """Commits a two-phase sync round: each prepared shard gets the others' sums of squares, summed in shard order.

        Every worker of the round computes the same sums from the same answers,
        so their commits are equal: the first applies the round, the others
        are answered. A shard that lost its prepared round (restarted) gets
        the push again, and is committed on the next try.
        """
        if any(result.round_square_sums is None for result in results):
            missing = next(i for i, r in enumerate(results) if r.round_square_sums is None)
            raise OptserveError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"shard {missing} ({self.client.addresses[missing]}): answered a two-phase round "
                                f"without its sums of squares (it applied newer rounds since?); pull and push again")
        totals = [np.float32(r.round_square_sums.global_square_sum) for r in results]
        pieces = {name: np.float32(value)
                  for r in results for name, value in r.round_square_sums.tensor_square_sums.items()}
        inputs = self._others(totals, pieces)
        prepared = [i for i, result in enumerate(results) if result.prepared]

        def commit(index: int) -> PushResult:
            part = self._parts[index]
            request = lambda: pb.CommitRoundRequest(optimizer=self.name, version=int(results[index]),  # noqa: E731
                                                    norm_inputs=inputs[index])
            return PushResult.from_wire(part.client._call(part.client._stub.CommitRound, request, _PUSH_RETRY))

        committed = dict(zip(prepared, self.client._try_each(commit, prepared)))
        lost = [i for i, (ok, err) in committed.items()
                if not ok and err.code() == grpc.StatusCode.FAILED_PRECONDITION and "is prepared" in err.details()]
        failed = [(i, err) for i, (ok, err) in committed.items() if not ok and i not in lost]
        if failed:
            outcomes = [committed.get(i, (True, r)) for i, r in enumerate(results)]
            raise self._push_error(outcomes, failed, worker_id, seq)
        results = [committed[i][1] if i in committed and committed[i][0] else r for i, r in enumerate(results)]
        for index, again in zip(lost, self.client._each(send, lost)):
            results[index] = again
        return results

    def _complete_stale(self, outcomes: list, failed: list, send: Callable[..., PushResult]) -> list:
        """Completes an async push that some shards refused for its `base_version` and the others applied.

        The shards' versions differ while pushes are in flight, so they may
        judge one `base_version` differently (too stale, or ahead of a shard
        that lags); the push is then completed with each refusing shard's
        current version as its base (those shards applied nothing, so sending
        it again cannot apply it twice), as the shards that took it judged it.
        """
        stale = [index for index, _ in failed]
        current = self.client._each(lambda index: self._parts[index].info().version, stale)
        again = self.client._try_each(lambda pair: send(pair[0], pair[1]), list(zip(stale, current)))
        outcomes = list(outcomes)
        for index, outcome in zip(stale, again):
            outcomes[index] = outcome
        return outcomes

    def _push_error(self, outcomes: list, failed: list, worker_id: str, seq: int | None) -> OptserveError:
        """The error of a push some shards refused: which did, and what the others' acknowledgement means."""
        addresses = self.client.addresses
        index, err = failed[0]
        reasons = "; ".join(f"shard {i} ({addresses[i]}): {e.code().name}: {e.details()}" for i, e in failed)
        applied = [i for i, (ok, _) in enumerate(outcomes) if ok]
        if not applied:
            return OptserveError(err.code(), f"no shard applied the push: {reasons}")
        if worker_id and seq is not None:
            then = (f"the model is part-stepped until the same push (worker_id {worker_id!r}, seq {seq}) is sent "
                    f"again, which completes it: the shards that have it answer duplicate")
        else:
            then = "the model is part-stepped, and without worker_id and seq a retry would step those shards twice"
        return OptserveError(err.code(), f"push applied by shards {applied} but not by {[i for i, _ in failed]} "
                                         f"({reasons}); {then}")

    def pull(self, ema: bool = False, names: Iterable[str] = (), *, min_version: int | None = None,
             timeout: float | None = None, into: Weights | None = None, copy: bool = True, like: Any = None) -> Any:
        """Gathers every shard's pieces of the tensors; see `Optimizer.pull` (`like` returns that tree).

        `.version` is the logical version (the smallest shard's), `.versions`
        each shard's. Sync: all come from one round (lagging shards are pulled
        again with that round's version as `min_version`). Async: each shard's
        pieces are one consistent snapshot of that shard; different shards
        may be at different versions. `min_version` waits for every shard to
        reach it. `copy` is accepted for the API's sake; the pieces are always
        copied into the result.
        """
        del copy
        if like is not None:
            if names:
                raise InvalidArgumentError("names: give names or like, not both (like's paths name the tensors)")
            names = list(trees.flatten(like, "like"))
        weights = self._pull(pb.STATE_KIND_EMA if ema else pb.STATE_KIND_WEIGHTS, names, min_version, timeout, into)
        return weights if like is None else weights.as_tree(like)

    def pull_slot(self, slot: str, names: Iterable[str] = ()) -> Weights:
        """One slot of the class by its tf-keras name (see `Optimizer.pull_slot`), gathered from every shard."""
        if not isinstance(slot, str) or not slot or slot in ("weights", "ema"):
            raise InvalidArgumentError(f"slot: must be a slot's tf-keras name, got {slot!r}")
        if slot in _SLOTS:
            return self._pull(_SLOTS[slot], names)
        return self._pull(pb.STATE_KIND_UNSPECIFIED, names, slot=slot)

    def gradient_buffers(self) -> dict[str, np.ndarray]:
        """Writable float32 arrays, one per logical tensor, to compute gradients into."""
        return {name: np.zeros(shape, np.float32) for name, shape in self._tensors.items()}

    def info(self) -> OptimizerInfo:
        """The logical optimizer's metadata: logical version and tensors; `.shards` holds each shard's own."""
        infos = self.client._each(lambda part: part.info(), self._parts)
        first = infos[0]
        return OptimizerInfo(
            name=self.name, iterations=min(i.iterations for i in infos), version=min(i.version for i in infos),
            config=first.config, tensors={name: (shape, "float32") for name, shape in self._tensors.items()},
            device=",".join(i.device for i in infos), non_finite_policy=first.non_finite_policy,
            next_learning_rate=first.next_learning_rate, training_mode=first.training_mode,
            pending_gradients=max(i.pending_gradients for i in infos),
            saved_version=min(i.saved_version for i in infos),
            pushes_per_second=min(i.pushes_per_second for i in infos),
            last_push_age=None if any(i.last_push_age is None for i in infos) else max(i.last_push_age for i in infos),
            clients=tuple(c for i in infos for c in i.clients), optimizer=first.optimizer, slots=first.slots,
            shard=first.shard, shards=tuple(infos))

    def save(self) -> int:
        """Checkpoints every shard; returns the smallest version saved."""
        return min(self.client._each(lambda part: part.save(), self._parts))

    def finalize(self) -> OptimizerInfo:
        """Copies the EMA into the weights on every shard."""
        self.client._each(lambda part: part.finalize(), self._parts)
        return self.info()

    def __repr__(self) -> str:
        return f"ShardedOptimizer({self.name!r} over {self.client.addresses})"

    def _split(self, grads: Mapping[str, Any], skip: bool = False) -> list[dict[str, Any]]:
        """Each shard's gradients: its rows of every dense gradient, its rows of every sparse one (rebased).

        With `skip`, tensors without a gradient are left out (each shard then skips their pieces)."""
        unknown = [name for name in grads if name not in self._tensors]
        if unknown:
            raise InvalidArgumentError(f"gradients[{unknown[0]!r}]: optimizer {self.name!r} has no such tensor")
        missing = [name for name in self._tensors if name not in grads]
        if missing and not skip:
            raise InvalidArgumentError(f"gradients[{missing[0]!r}]: missing; a push needs a gradient for every tensor "
                                       f"(or missing='skip' to leave such tensors as they are)")
        parts: list[dict[str, Any]] = [{} for _ in range(self.placement.count)]
        for name, grad in grads.items():
            shape = self._tensors[name]
            pieces = self.placement.of_tensor(name)
            if isinstance(grad, IndexedSlices):
                indices, values = np.asarray(grad.indices), np.asarray(grad.values)
                if indices.ndim != 1 or values.ndim < 1 or len(indices) != len(values) or not shape:
                    raise InvalidArgumentError(f"gradients[{name!r}]: IndexedSlices needs 1-D indices, one per row "
                                               f"of values, for a tensor of at least one dimension")
                if values.shape[1:] != shape[1:]:
                    raise InvalidArgumentError(f"gradients[{name!r}].values.shape: rows must be {shape[1:]}, got "
                                               f"{values.shape[1:]}")
                if not np.issubdtype(indices.dtype, np.integer):
                    raise InvalidArgumentError(f"gradients[{name!r}].indices.dtype: must be an integer type, got "
                                               f"{indices.dtype}")
                if indices.size and (indices.min() < 0 or indices.max() >= shape[0]):
                    raise InvalidArgumentError(f"gradients[{name!r}].indices: must be in [0, {shape[0]}), got "
                                               f"{indices.min()}..{indices.max()}")
                for piece in pieces:
                    rows = (indices >= piece.start) & (indices < piece.stop)
                    parts[piece.shard][piece.name] = IndexedSlices((indices[rows] - piece.start).astype(indices.dtype),
                                                                   values[rows])
                continue
            array = np.asarray(grad)
            if array.shape != shape:
                raise InvalidArgumentError(f"gradients[{name!r}].shape: must be {shape}, got {array.shape}")
            for piece in pieces:
                parts[piece.shard][piece.name] = array[piece.start:piece.stop] if shape else array
        return parts

    def _norm_inputs(self, parts: list[dict[str, Any]], wire_dtype: str | None) -> list[pb.NormInputs | None]:
        """Per shard, the other shards' sums of squares of the gradient, as the servers will see its values."""
        if self._sync:  # the round's combined gradient is clipped: its sums come with the prepared answers
            return [None] * len(parts)
        squares = [{name: _square_sum(grad, wire_dtype) for name, grad in part.items()} for part in parts]
        totals = [np.float32(sum(shard.values(), np.float32(0))) for shard in squares]
        return self._others(totals, {name: value for shard in squares for name, value in shard.items()})

    def _others(self, totals: list[np.float32], pieces: Mapping[str, np.float32]) -> list[pb.NormInputs]:
        """Per shard: the sum, in shard order, of the other shards' `totals`, and of each split piece's other pieces."""
        messages = []
        for index in range(len(totals)):
            other = np.float32(sum((totals[i] for i in range(len(totals)) if i != index), np.float32(0)))
            tensor_sums = {}
            if self._clip == "clipnorm":
                for piece in self.placement.of_shard(index):
                    if not piece.whole:
                        tensor_sums[piece.name] = float(np.float32(sum(
                            (pieces.get(p.name, np.float32(0)) for p in self.placement.of_tensor(piece.tensor)
                             if p.name != piece.name),
                            np.float32(0))))
            messages.append(pb.NormInputs(global_square_sum=float(other), tensor_square_sums=tensor_sums))
        return messages

    def _pull(self, kind: int, names: Iterable[str], min_version: int | None = None, timeout: float | None = None,
              into: Weights | None = None, slot: str = "") -> Weights:
        names = list(names)
        every_tensor_of_slot = bool(slot) and not names  # a class's slot may hold some tensors only (Adafactor's r, c)
        names = names or list(self._tensors)
        for name in names:
            if name not in self._tensors:
                raise OptserveError(_NOT_FOUND, f"names[{name!r}]: optimizer {self.name!r} has no tensor {name!r}")
        if len(set(names)) != len(names):
            raise InvalidArgumentError("names: a tensor is named twice")
        shapes = [self._tensors[name] for name in names]
        if into is not None and [(n, a.shape) for n, a in into.items()] != list(zip(names, shapes)):
            raise InvalidArgumentError(f"into: holds tensors {[(n, a.shape) for n, a in into.items()]}, the pull "
                                       f"reads {list(zip(names, shapes))}")
        wanted = [[p.name for name in names for p in self.placement.of_tensor(name) if p.shard == index]
                  for index in range(self.placement.count)]
        shards = [index for index in range(self.placement.count) if wanted[index]]

        def fetch(index: int, at_least: int | None) -> Weights:
            return self._parts[index]._pull(kind, [] if every_tensor_of_slot else wanted[index], at_least, timeout,
                                            slot=slot)

        pulled = dict(zip(shards, self.client._each(lambda i: fetch(i, min_version), shards)))
        for _ in range(SYNC_PULL_TRIES if self._sync else 0):  # one round on every shard
            target = max(w.version for w in pulled.values())
            behind = [i for i, w in pulled.items() if w.version < target]
            if not behind:
                break
            pulled.update(zip(behind, self.client._each(lambda i: fetch(i, target), behind)))
        else:
            if self._sync and len({w.version for w in pulled.values()}) > 1:
                versions = [w.version for w in pulled.values()]
                raise OptserveError(grpc.StatusCode.ABORTED, f"pull: the shards kept moving to new rounds ({versions}) "
                                                             f"over {SYNC_PULL_TRIES} tries; pull again")
        if every_tensor_of_slot:  # the tensors the shards' slot holds, in creation order, in the slot's shapes
            held = {self._pieces[piece].tensor: self._tensors[self._pieces[piece].tensor]
                    if self._pieces[piece].whole is False else values.shape
                    for weights in pulled.values() for piece, values in weights.items()}
            names = [name for name in names if name in held]
            shapes = [tuple(held[name]) for name in names]
        sizes = [4 * math.prod(shape) for shape in shapes]
        buffer = ChunkBuffer(sizes, InvalidArgumentError, None if into is None else into._buffer)
        tensors = {name: buffer.view(i, FLOAT32, shape) for i, (name, shape) in enumerate(zip(names, shapes))}
        for index, weights in pulled.items():
            for piece_name, values in weights.items():
                piece = self._pieces[piece_name]
                target_array = tensors[piece.tensor]
                if piece.tensor_shape and not piece.whole:
                    target_array[piece.start:piece.stop] = values
                else:
                    target_array[...] = values
        versions = tuple(pulled[i].version if i in pulled else None for i in range(self.placement.count))
        known = [v for v in versions if v is not None]
        result = Weights(tensors, min(known), min(pulled[i].iterations for i in pulled), buffer.data)
        result.versions = versions
        return result


def _dense_or_rows(grads: Any, skip: bool) -> dict[str, Any]:
    """A push's gradients by tensor path: IndexedSlices for sparse ones (by type), NumPy for dense ones.

    A None leaf is a tensor without a gradient: left out under `skip`, else refused."""
    flat = {}
    for name, grad in trees.flatten(grads, "gradients").items():
        if grad is None:
            if not skip:
                raise InvalidArgumentError(f"gradients[{name!r}]: is None (no gradient); push with missing='skip' "
                                           f"to leave such tensors as they are")
            continue
        rows = sparse_rows(grad)
        flat[name] = rows if rows is not None else to_numpy(grad)
    return flat


def _judged_by_version(err: OptserveError) -> bool:
    """A shard's refusal of an async push for its base_version alone: too stale, or ahead of the shard."""
    details = err.details()
    return (err.code() == grpc.StatusCode.ABORTED and "max_staleness" in details) or (
        err.code() == grpc.StatusCode.INVALID_ARGUMENT and "is ahead of the current version" in details)


def _combined_result(results: list[PushResult]) -> PushResult:
    """The logical answer to a push every shard applied: the largest version, each shard's in `.versions`."""
    result = PushResult(max(results))
    result.iterations = max(r.iterations for r in results)
    result.duplicate = all(r.duplicate for r in results)
    result.versions = tuple(int(r) for r in results)
    return result


def _square_sum(grad: Any, wire_dtype: str | None) -> np.float32:
    """The float32 sum of squares of one gradient (a sparse one's value rows), as its server will read it."""
    values = grad.values if isinstance(grad, IndexedSlices) else grad
    data_type, sent = _wire_values(values, wire_dtype, "gradient")
    if data_type == pb.DATA_TYPE_BFLOAT16 and sent.dtype == np.uint16:  # raw bfloat16 bits
        sent = (sent.astype(np.uint32) << 16).view(np.float32)
    return np.sum(np.square(np.asarray(sent, np.float32)), dtype=np.float32)


def _shard_to_wire(index: int, table: Placement) -> pb.ShardDescription:
    return pb.ShardDescription(
        index=index, count=table.count, max_shard_bytes=table.max_shard_bytes,
        pieces=[pb.ShardPiece(name=p.name, tensor=p.tensor, shard=p.shard, row_start=p.start, row_stop=p.stop,
                              tensor_shape=p.tensor_shape) for p in table.pieces])
