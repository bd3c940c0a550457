"""Create-if-missing: the first worker to arrive creates an optimizer, the others attach to it.

Race-safe through the server's atomic create: a worker that finds no optimizer
creates it, and one whose create is answered ALREADY_EXISTS (another worker won
the race) attaches. An existing optimizer is used only if it agrees with what
the attaching worker would have created: the same tensor names and shapes, the
same mode settings, and the same value for every config key the worker gave.
"""

from collections.abc import Callable, Mapping
from typing import Any

import grpc

from optserve.client.errors import OptserveError


def create_or_attach(create: Callable[[], None], existing: Callable[[], Any], shapes: Mapping[str, tuple[int, ...]],
                     config: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """Runs `create()` unless `existing()` (an OptimizerInfo) finds the optimizer; then checks that it agrees.

    ALREADY_EXISTS, naming the first field that differs, if the optimizer there
    disagrees with `shapes`, `config` (only the keys given) or `settings` (the
    training mode's fields, non_finite_policy and the non-trainable tensors).
    """
    try:
        info = existing()
    except OptserveError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        try:
            create()
            return
        except OptserveError as raced:
            if raced.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        info = existing()
    difference = _first_difference(info, shapes, config, settings)
    if difference is not None:
        raise OptserveError(grpc.StatusCode.ALREADY_EXISTS,
                            f"{difference}: optimizer {info.name!r} exists already and differs from this create, "
                            "so it cannot be attached to")


def _first_difference(info: Any, shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any],
                      settings: Mapping[str, Any]) -> str | None:
    """The first field in which the existing optimizer `info` differs, with both values; None if it agrees."""
    theirs = {name: tuple(shape) for name, (shape, _) in info.tensors.items()}
    for name, shape in shapes.items():
        if name not in theirs:
            return f"params[{name!r}]: the optimizer has no such tensor (it has {sorted(theirs)[:8]})"
        if theirs[name] != tuple(shape):
            return f"params[{name!r}]: shape {tuple(shape)}, the optimizer's is {theirs[name]}"
    extra = [name for name in theirs if name not in shapes]
    if extra:
        return f"params: lacks the optimizer's tensor {extra[0]!r}"
    for key, value in config.items():
        if key in info.config and not _same(info.config[key], value):
            return f"config[{key!r}]: {value!r}, the optimizer's is {info.config[key]!r}"
    current = {**info.training_mode, "non_finite_policy": info.non_finite_policy,
               "non_trainable": tuple(info.non_trainable), "optimizer": getattr(info, "optimizer", "Adam")}
    for key, value in settings.items():
        if not _same(current.get(key), value):
            return f"{key}: {value!r}, the optimizer's is {current.get(key)!r}"
    return None


def _same(theirs: Any, ours: Any) -> bool:
    """Equal as the server reports them: JSON values, so tuples compare as lists and 1 as 1.0."""
    if isinstance(ours, (list, tuple)) and isinstance(theirs, (list, tuple)):
        return len(ours) == len(theirs) and all(_same(a, b) for a, b in zip(theirs, ours))
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        return ours.keys() == theirs.keys() and all(_same(theirs[k], ours[k]) for k in ours)
    return theirs == ours

