"""optserve for PyTorch: `RemoteOptimizer`, a torch.optim.Optimizer whose state and step live on an optserve server.

    model = torch.nn.Sequential(...)
    opt = RemoteOptimizer(model, "127.0.0.1:50051", "mnist", {"learning_rate": 1e-3})
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()            # pushes the .grads, copies the new weights into the parameters

Needs the `torch` extra (`pip install "optserve[torch]"`).
"""

import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import torch

from optserve.client import Client, InvalidArgumentError, OptserveError, Weights

__all__ = ["RemoteOptimizer"]

STALE_RETRIES = 3  # a push refused as too stale (ABORTED) is re-pulled and retried this many times


class RemoteOptimizer(torch.optim.Optimizer):
    """A torch optimizer that trains through an optserve server: `step()` pushes the gradients and pulls the weights.

    `params` is a module (its `named_parameters()` name the tensors), an
    iterable of `(name, parameter)` pairs, of parameters (named by position,
    "0", "1", ...) or of parameter groups (dicts with "params"; one config
    serves every tensor, so a group may carry no options of its own). `client`
    is a `Client` or an address. The optimizer `name` is created from the
    parameters' current values with `config` (Keras arguments; Adam with
    `{"adaptive_epsilon": True}` is `torch.optim.Adam`'s numbers) and
    `create_or_mode_options` (`mode`, `num_workers`, `max_staleness`, ...) by
    the first worker to arrive; the others attach to it (a disagreeing shape,
    config or mode is refused with ALREADY_EXISTS), and every worker starts
    from the server's weights.

    `worker_id` names this worker for exactly-once pushes (default: a random
    one; give a stable one, with `load_state_dict`, to resume after a restart).
    Non-trainable state lives on the server too: `buffers` (a module, or a
    dict of tensors; default the module's `named_buffers()` when `params` is a
    module, BatchNorm's running statistics) is created with the optimizer,
    pushed with every step and copied back (sync mode: the round's mean).

    A parameter whose `.grad` is None is skipped (`missing="skip"`): its
    weights and slots stay as they are, as Keras leaves a variable without a gradient.
    """

    def __init__(self, params: Any, client: Client | str, name: str, config: Mapping[str, Any] | None = None,
                 optimizer: str = "Adam", *, worker_id: str | None = None, buffers: Any = None,
                 **create_or_mode_options: Any):
        self._owns_client = isinstance(client, str)
        self.client = Client(client) if isinstance(client, str) else client
        self.name = name
        self.worker_id = worker_id or f"torch-{uuid.uuid4().hex}"
        if buffers is None and isinstance(params, torch.nn.Module):
            buffers = params
        self._buffers = dict(buffers.named_buffers() if isinstance(buffers, torch.nn.Module) else buffers or {})
        groups, self._names = _named_groups(params)
        try:
            super().__init__(groups, {})
        except (TypeError, ValueError) as err:  # torch's own checks (a non-leaf tensor): as the client's refusals
            raise InvalidArgumentError(f"params: {err}") from None
        self._params = {self._names[id(p)]: p for group in self.param_groups for p in group["params"]}
        self.remote = self.client.create_optimizer(name, self._params, config, if_exists="attach",
                                                   state=self._buffers or None,
                                                   optimizer=optimizer, **create_or_mode_options)
        self._seq = 0  # the next push's seq
        self._version = -1  # of the weights in the parameters
        self._weights: Weights | None = None  # the last pull, refilled by the next one
        self._pending: Future | None = None  # the push in flight (step_async)
        self._pushed_buffers: dict[str, torch.Tensor] = {}  # the buffers' values that push carried
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"optserve-{name}")
        self._copy_in(self.remote.pull())

    def step(self, closure: Any = None) -> Any:
        """One step: runs `closure` (if given), pushes every `.grad`, waits, and copies the new weights in place."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_async()
        self.synchronize()
        return loss

    def step_async(self) -> "Future[Any]":
        """Starts a step and returns at once: a future of its `PushResult` (the version that includes it).

        The gradients are copied now, so the next batch may compute (and zero
        or overwrite them) while the push travels; its weights reach the
        parameters at the next `step`, `step_async`, `synchronize` or
        `state_dict` (so that batch computes on the weights before this step).
        """
        self.synchronize()
        grads = {name: param.grad.detach().clone() for name, param in self._params.items() if param.grad is not None}
        if not grads:
            raise InvalidArgumentError("gradients: no parameter has a .grad; call backward() before step()")
        seq, base_version = self._seq, self._version
        self._seq += 1
        self._pushed_buffers = {name: buffer.detach().clone() for name, buffer in self._buffers.items()}
        self._pending = self._executor.submit(self._exchange, grads, dict(self._pushed_buffers), seq, base_version)
        return self._pending

    def synchronize(self) -> None:
        """Waits for the push in flight, if any, and copies its weights into the parameters (its error, raised)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
            self._copy_in(self._weights, self._pushed_buffers)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint of this worker needs: the optimizer's name, worker id and next seq (state is remote)."""
        self.synchronize()
        return {"state": {}, "param_groups": [{"params": list(range(len(self._params)))}],
                "optserve": {"address": self.client.address, "optimizer": self.name, "worker_id": self.worker_id,
                             "next_seq": self._seq, "version": self._version, "tensors": list(self._params)}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resumes as the worker a `state_dict()` describes, from the server's current weights."""
        self.synchronize()
        saved = state_dict.get("optserve") if isinstance(state_dict, Mapping) else None
        if not isinstance(saved, Mapping):
            raise InvalidArgumentError("state_dict: not one of RemoteOptimizer.state_dict() (no 'optserve' entry)")
        if saved.get("optimizer") != self.name or list(saved.get("tensors", ())) != list(self._params):
            raise InvalidArgumentError(f"state_dict: saved for optimizer {saved.get('optimizer')!r} with tensors "
                                       f"{list(saved.get('tensors', ()))[:8]}, not {self.name!r} with "
                                       f"{list(self._params)[:8]}")
        self.worker_id, self._seq = str(saved["worker_id"]), int(saved["next_seq"])
        self._copy_in(self.remote.pull())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only while constructing: the optimizer's tensors are fixed once it exists on the server."""
        if hasattr(self, "remote"):
            raise InvalidArgumentError("param_group: the optimizer's tensors are fixed once it is created")
        super().add_param_group(param_group)

    def close(self) -> None:
        """Finishes the push in flight and frees the worker thread (and the client, if this made it)."""
        try:
            self.synchronize()
        finally:
            self._executor.shutdown()
            if self._owns_client:
                self.client.close()

    def __enter__(self) -> "RemoteOptimizer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _exchange(self, grads: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], seq: int,
                  base_version: int) -> Any:
        """In the worker thread: pushes (a stale push re-pulled and retried), then pulls the weights that include it."""
        for attempt in range(STALE_RETRIES + 1):
            try:
                result = self.remote.push(grads, worker_id=self.worker_id, seq=seq, base_version=base_version,
                                          missing="skip", state=buffers or None)
                break
            except OptserveError as err:
                if err.code() != grpc.StatusCode.ABORTED or attempt == STALE_RETRIES:
                    raise
                base_version = self.remote.info().version  # retried against the news
        self._weights = self.remote.pull(min_version=int(result), into=self._weights)
        return result

    def _copy_in(self, weights: Weights, pushed: Mapping[str, torch.Tensor] | None = None) -> None:
        """The pulled weights into the parameters, in place (their memory, device and dtype kept), and the buffers.

        A buffer takes the server's value plus what changed here since `pushed`
        was sent (a forward pass that overlapped a `step_async`), so no local
        update is lost; without `pushed`, the server's value.
        """
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(torch.from_numpy(weights[name]))
            for name, buffer in self._buffers.items():
                served = torch.from_numpy(weights[name])
                if pushed is not None:  # served + (the change since the push): exactly served when none
                    served = served + (buffer.to(served.dtype) - pushed[name].to(served.dtype))
                buffer.copy_(served)
        self._version = weights.version


def _named_groups(params: Any) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Parameter groups of plain tensors, and each tensor's name by id: a module's names, the pairs', or positions."""
    if isinstance(params, torch.nn.Module):
        params = list(params.named_parameters())
    if isinstance(params, torch.Tensor):
        raise InvalidArgumentError("params: an iterable of parameters, (name, parameter) pairs or groups, "
                                   "or a module; not one tensor")
    items = list(params)
    if not items:
        raise InvalidArgumentError("params: no parameters")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    names: dict[int, str] = {}
    plain = []
    for index, group in enumerate(groups):
        options = sorted(key for key in group if key not in ("params", "param_names"))
        if options:
            raise InvalidArgumentError(f"param_groups[{index}][{options[0]!r}]: one config serves every tensor; "
                                       "give options in config, not per group")
        members = group["params"]
        members = ([(None, members)] if isinstance(members, torch.Tensor)
                   else list(_pairs(members, group.get("param_names"))))
        tensors = []
        for name, tensor in members:
            name = str(len(names)) if name is None else name
            if name in names.values():
                raise InvalidArgumentError(f"params: two parameters are named {name!r}")
            if id(tensor) in names:
                raise InvalidArgumentError(f"params[{name!r}]: the parameter {names[id(tensor)]!r} appears twice")
            names[id(tensor)] = name
            tensors.append(tensor)
        plain.append({"params": tensors})
    return plain, names


def _pairs(members: Iterable[Any], param_names: list[str] | None) -> Iterable[tuple[str | None, torch.Tensor]]:
    """(name or None, tensor) for each member of a group: a tensor or a (name, tensor) pair."""
    for index, member in enumerate(members):
        if isinstance(member, tuple) and len(member) == 2 and isinstance(member[0], str):
            yield member
        elif isinstance(member, torch.Tensor):
            yield (param_names[index] if param_names else None), member
        else:
            raise InvalidArgumentError(f"params[{index}]: a parameter or a (name, parameter) pair, got "
                                       f"{type(member).__name__}")
