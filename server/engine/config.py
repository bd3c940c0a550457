"""The tf-keras optimizer configurations: one table per class, parsing, validation and serialization.

`parse_config` accepts what a tf-keras optimizer's `get_config()` returns
(or the constructor's keyword arguments, defaults filled in), and
`parse_optimizer` also Keras's serialized form (`class_name`, `config`,
`module`, `registered_name`). Both are stricter than Keras, which validates
almost nothing (spec/keras-adam.md §5). Every refusal is an
`InvalidArgument` whose message starts with the field path, e.g.
``config.beta_1: must be in [0, 1), got 1.5``.
"""

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

import numpy as np

from optserve.server.engine.schedules import (
    SCHEDULE_CLASSES,
    PiecewiseConstantDecay,
    Schedule,
)
from optserve.server.errors import InvalidArgument


@dataclass(frozen=True)
class OptimizerConfig:
    """The arguments every tf-keras optimizer shares, with the base class's defaults; build it with `parse_config`.

    Each class of the family is a subclass that adds its own arguments and
    overrides the defaults it changes (tf-keras's constructors differ: SGD's
    lr is 0.01, RMSprop's `ema_overwrite_frequency` 100, ...). Hashable, so it
    can key caches and be a trace constant of the jitted step.
    `exclude_from_weight_decay` holds regular expressions searched in tensor
    names (tf-keras `exclude_from_weight_decay(var_names=...)`).
    """

    class_name: ClassVar[str] = ""  # the tf-keras class, e.g. "RMSprop"

    learning_rate: float | Schedule = 0.001
    weight_decay: float | None = None
    exclude_from_weight_decay: tuple[str, ...] = ()
    clipnorm: float | None = None
    clipvalue: float | None = None
    global_clipnorm: float | None = None
    use_ema: bool = False
    ema_momentum: float = 0.99
    ema_overwrite_frequency: int | None = None
    jit_compile: bool = True
    name: str = ""

    def to_keras_dict(self) -> dict[str, Any]:
        """The config as tf-keras `get_config()` writes it, plus `exclude_from_weight_decay` (and Adam's
        `adaptive_epsilon`, which tf-keras leaves out).

        JSON-serializable; a schedule becomes ``{"class_name", "config"}`` with
        every argument present. `parse_config(result, class_name)` equals `self`.
        """
        lr = self.learning_rate
        if not isinstance(lr, int | float):
            lr = {"class_name": type(lr).__name__, "config": _schedule_to_dict(lr)}
        shared = {
            "name": self.name,
            "weight_decay": self.weight_decay,
            "clipnorm": self.clipnorm,
            "global_clipnorm": self.global_clipnorm,
            "clipvalue": self.clipvalue,
            "use_ema": self.use_ema,
            "ema_momentum": self.ema_momentum,
            "ema_overwrite_frequency": self.ema_overwrite_frequency,
            "jit_compile": self.jit_compile,
            "is_legacy_optimizer": False,
            "learning_rate": lr,
        }
        own = {field: getattr(self, field) for field in CLASS_ARGUMENTS[self.class_name]}
        return {**shared, **own, "exclude_from_weight_decay": list(self.exclude_from_weight_decay)}


@dataclass(frozen=True)
class SGDConfig(OptimizerConfig):
    class_name: ClassVar[str] = "SGD"
    learning_rate: float | Schedule = 0.01
    name: str = "SGD"
    momentum: float = 0.0
    nesterov: bool = False


@dataclass(frozen=True)
class RMSpropConfig(OptimizerConfig):
    class_name: ClassVar[str] = "RMSprop"
    ema_overwrite_frequency: int | None = 100
    name: str = "RMSprop"
    rho: float = 0.9
    momentum: float = 0.0
    epsilon: float = 1e-7
    centered: bool = False


@dataclass(frozen=True)
class AdagradConfig(OptimizerConfig):
    class_name: ClassVar[str] = "Adagrad"
    name: str = "Adagrad"
    initial_accumulator_value: float = 0.1
    epsilon: float = 1e-7


@dataclass(frozen=True)
class AdadeltaConfig(OptimizerConfig):
    class_name: ClassVar[str] = "Adadelta"
    name: str = "Adadelta"
    rho: float = 0.95
    epsilon: float = 1e-7


@dataclass(frozen=True)
class _MomentsConfig(OptimizerConfig):
    """The arguments of the classes with two moment decay rates and an epsilon (Adam, Adamax, Nadam)."""

    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7


@dataclass(frozen=True)
class AdamConfig(_MomentsConfig):
    class_name: ClassVar[str] = "Adam"
    name: str = "Adam"
    amsgrad: bool = False
    adaptive_epsilon: bool = False  # tf-keras 2.21: epsilon * sqrt(1 - beta_2**t), PyTorch's and optax's placement


@dataclass(frozen=True)
class AdamWConfig(AdamConfig):
    class_name: ClassVar[str] = "AdamW"
    weight_decay: float | None = 0.004
    name: str = "AdamW"


@dataclass(frozen=True)
class AdamaxConfig(_MomentsConfig):
    class_name: ClassVar[str] = "Adamax"
    name: str = "Adamax"


@dataclass(frozen=True)
class NadamConfig(_MomentsConfig):
    class_name: ClassVar[str] = "Nadam"
    name: str = "Nadam"


@dataclass(frozen=True)
class FtrlConfig(OptimizerConfig):
    class_name: ClassVar[str] = "Ftrl"
    name: str = "Ftrl"
    learning_rate_power: float = -0.5
    initial_accumulator_value: float = 0.1
    l1_regularization_strength: float = 0.0
    l2_regularization_strength: float = 0.0
    l2_shrinkage_regularization_strength: float = 0.0
    beta: float = 0.0


@dataclass(frozen=True)
class LionConfig(OptimizerConfig):
    class_name: ClassVar[str] = "Lion"
    learning_rate: float | Schedule = 0.0001
    name: str = "Lion"
    beta_1: float = 0.9
    beta_2: float = 0.99


@dataclass(frozen=True)
class AdafactorConfig(OptimizerConfig):
    class_name: ClassVar[str] = "Adafactor"
    name: str = "Adafactor"
    beta_2_decay: float = -0.8
    epsilon_1: float = 1e-30
    epsilon_2: float = 1e-3
    clip_threshold: float = 1.0
    relative_step: bool = True


CONFIG_CLASSES: dict[str, type[OptimizerConfig]] = {
    cls.class_name: cls for cls in (SGDConfig, RMSpropConfig, AdagradConfig, AdadeltaConfig, AdamConfig, AdamWConfig,
                                    AdamaxConfig, NadamConfig, FtrlConfig, LionConfig, AdafactorConfig)
}
"""Every class of `tf_keras.optimizers`, by its Keras name."""

_SHARED_FIELDS = frozenset(field.name for field in dataclasses.fields(OptimizerConfig))
CLASS_ARGUMENTS: dict[str, tuple[str, ...]] = {
    name: tuple(field.name for field in dataclasses.fields(cls) if field.name not in _SHARED_FIELDS)
    for name, cls in CONFIG_CLASSES.items()
}
"""Each class's own constructor arguments, in tf-keras's order."""


def _schedule_to_dict(schedule: Schedule) -> dict[str, Any]:
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dataclasses.asdict(schedule).items()
    }


# --- single-value checks: (path, raw value) -> normalised value ---------------


def _fail(path: str, message: str) -> NoReturn:
    raise InvalidArgument(f"{path}: {message}")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _number(path: str, value: Any) -> int | float:
    """A finite real number; bools are refused, ints stay ints."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        _fail(path, f"must be a number, got {_describe(value)}")
    if isinstance(value, numbers.Integral):
        if abs(value) >= 2**63:
            _fail(path, f"must be below 2**63 in magnitude, got {value}")
        return int(value)
    if not math.isfinite(value):
        _fail(path, f"must be finite, got {value}")
    return float(value)


def _non_negative(path: str, value: Any) -> int | float:
    number = _number(path, value)
    if number < 0:
        _fail(path, f"must be >= 0, got {number}")
    return number


def _positive(path: str, value: Any) -> int | float:
    number = _number(path, value)
    if number <= 0:
        _fail(path, f"must be > 0, got {number}")
    return number


def _fraction(path: str, value: Any) -> float:
    """A decay rate of a moving average: in [0, 1)."""
    number = float(_number(path, value))
    if not 0 <= number < 1:
        _fail(path, f"must be in [0, 1), got {number}")
    return number


def _ema_momentum(path: str, value: Any) -> float:
    number = float(_number(path, value))
    if not 0 <= number <= 1:
        _fail(path, f"must be in [0, 1], got {number}")
    return number


def _clip(path: str, value: Any) -> float | None:
    """A clipping threshold; tf-keras silently ignores values <= 0, we refuse them."""
    if value is None:
        return None
    number = float(_number(path, value))
    if number <= 0:
        _fail(path, f"must be > 0 or null (tf-keras would silently not clip), got {number}")
    return number


def _weight_decay(path: str, value: Any) -> float | None:
    return None if value is None else float(_non_negative(path, value))


def _overwrite_frequency(path: str, value: Any) -> int | None:
    """None or an int >= 1; Keras reads 0 as "never", normalised here to None."""
    if value is None:
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        _fail(path, f"must be null or an integer in [1, 2**31), got {_describe(value)}")
    if not 0 <= value < 2**31:  # the step counter it divides is an int32
        _fail(path, f"must be null or an integer in [1, 2**31), got {value}")
    return int(value) or None


def _t_mul(path: str, value: Any) -> int | float:
    number = _number(path, value)
    if number < 1:
        _fail(path, f"must be >= 1 (below 1 the schedule turns NaN after a finite number of steps), got {number}")
    return number


def _bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        _fail(path, f"must be true or false, got {_describe(value)}")
    return bool(value)


def _string(path: str, value: Any) -> str:
    if not isinstance(value, str):
        _fail(path, f"must be a string, got {_describe(value)}")
    return value


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda path, value: None if value is None else check(path, value)


def _list_of(check: Callable[[str, Any], Any]) -> Callable[[str, Any], tuple]:
    def check_list(path: str, value: Any) -> tuple:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            _fail(path, f"must be a list, got {_describe(value)}")
        return tuple(check(f"{path}[{i}]", item) for i, item in enumerate(value))

    return check_list


MAX_PATTERNS = 256  # exclude_from_weight_decay entries; each compiles in-process, so both are bounded
MAX_PATTERN_CHARS = 1024


def _regex(path: str, value: Any) -> str:
    pattern = _string(path, value)
    if len(pattern) > MAX_PATTERN_CHARS:
        _fail(path, f"at most {MAX_PATTERN_CHARS} characters, got {len(pattern)}")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:  # RecursionError: nested too deeply
        _fail(path, f"is not a valid regular expression ({err}): {pattern[:80]!r}")
    return pattern


def _exclusions(path: str, value: Any) -> tuple[str, ...]:
    """Regular expressions (Keras `var_names`); None means none."""
    if value is None:
        return ()
    patterns = _list_of(_regex)(path, value[:MAX_PATTERNS + 1] if isinstance(value, list) else value)
    if len(patterns) > MAX_PATTERNS:
        _fail(path, f"at most {MAX_PATTERNS} patterns, got {len(value)}")
    return patterns


# --- schedules ----------------------------------------------------------------

_SCHEDULE_ARGUMENTS: dict[str, Callable[[str, Any], Any]] = {
    "initial_learning_rate": _non_negative,
    "decay_steps": _positive,
    "first_decay_steps": _positive,
    "decay_rate": _non_negative,
    "staircase": _bool,
    "cycle": _bool,
    "end_learning_rate": _non_negative,
    "power": _non_negative,
    "alpha": _non_negative,
    "warmup_target": _optional(_non_negative),
    "warmup_steps": _non_negative,
    "t_mul": _t_mul,
    "m_mul": _non_negative,
    "boundaries": _list_of(_number),
    "values": _list_of(_non_negative),
    "name": _optional(_string),
}
"""How each schedule argument is checked, by name (shared by the six classes)."""

_SCHEDULE_KEYS = ("class_name", "config", "module", "registered_name")


def _check_keys(path: str, raw: Mapping, allowed: Sequence[str]) -> None:
    for key in raw:
        if not isinstance(key, str):
            _fail(path, f"keys must be strings, got {_describe(key)}")
        if key not in allowed:
            _fail(f"{path}.{key}", f"unknown key; allowed keys: {', '.join(sorted(allowed))}")


def _mapping(path: str, value: Any) -> Mapping:
    if not isinstance(value, Mapping):
        _fail(path, f"must be an object, got {_describe(value)}")
    return value


def _schedule(path: str, raw: Mapping) -> Schedule:
    """A serialized Keras schedule: {"class_name", "config"} (+ "module", "registered_name")."""
    _check_keys(path, raw, _SCHEDULE_KEYS)
    for key in ("module", "registered_name"):
        _optional(_string)(f"{path}.{key}", raw.get(key))
    if "class_name" not in raw:
        _fail(f"{path}.class_name", "missing")
    class_name = _string(f"{path}.class_name", raw["class_name"])
    if class_name not in SCHEDULE_CLASSES:
        _fail(f"{path}.class_name", f"unknown schedule {class_name!r}; known: {', '.join(SCHEDULE_CLASSES)}")
    cls = SCHEDULE_CLASSES[class_name]
    if "config" not in raw:
        _fail(f"{path}.config", "missing")
    arguments = _mapping(f"{path}.config", raw["config"])
    fields = dataclasses.fields(cls)
    _check_keys(f"{path}.config", arguments, [field.name for field in fields])
    values = {}
    for field in fields:
        field_path = f"{path}.config.{field.name}"
        if field.name in arguments:
            values[field.name] = _SCHEDULE_ARGUMENTS[field.name](field_path, arguments[field.name])
        elif field.default is dataclasses.MISSING:
            _fail(field_path, f"missing (required by {class_name})")
    schedule = cls(**values)
    if isinstance(schedule, PiecewiseConstantDecay):
        _check_piecewise(f"{path}.config", schedule)
    return schedule


def _check_piecewise(path: str, schedule: PiecewiseConstantDecay) -> None:
    boundaries = schedule.boundaries
    if not boundaries:
        _fail(f"{path}.boundaries", "must not be empty")
    if any(low >= high for low, high in zip(boundaries, boundaries[1:])):
        _fail(f"{path}.boundaries", f"must be strictly increasing, got {list(boundaries)}")
    if len(schedule.values) != len(boundaries) + 1:
        _fail(
            f"{path}.values",
            f"must have len(boundaries) + 1 = {len(boundaries) + 1} entries, got {len(schedule.values)}",
        )


def _learning_rate(path: str, value: Any) -> float | Schedule:
    if isinstance(value, Mapping):
        return _schedule(path, value)
    return float(_positive(path, value))


# --- the class tables ---------------------------------------------------------


def _epsilon(path: str, value: Any) -> float:
    return float(_non_negative(path, value))


def _closed_fraction(path: str, value: Any) -> float:
    """A momentum or decay rate that may be 1: in [0, 1]."""
    number = float(_number(path, value))
    if not 0 <= number <= 1:
        _fail(path, f"must be in [0, 1], got {number}")
    return number


def _lion_beta_1(path: str, value: Any) -> float:
    number = float(_number(path, value))
    if not 0 < number <= 1:  # tf-keras raises too: at 0 Lion degenerates to SignSGD
        _fail(path, f"must be in (0, 1], got {number}")
    return number


def _non_positive(path: str, value: Any) -> float:
    number = float(_number(path, value))
    if number > 0:
        _fail(path, f"must be <= 0, got {number}")
    return number


def _real(path: str, value: Any) -> float:
    return float(_non_negative(path, value))


_SHARED_ARGUMENTS: dict[str, Callable[[str, Any], Any]] = {
    "learning_rate": _learning_rate,
    "weight_decay": _weight_decay,
    "exclude_from_weight_decay": _exclusions,
    "clipnorm": _clip,
    "clipvalue": _clip,
    "global_clipnorm": _clip,
    "use_ema": _bool,
    "ema_momentum": _ema_momentum,
    "ema_overwrite_frequency": _overwrite_frequency,
    "jit_compile": _bool,
    "name": _string,
}
"""How each argument of the base class is checked and normalised."""

_ADAM_ARGUMENTS: dict[str, Callable[[str, Any], Any]] = {
    "beta_1": _fraction,
    "beta_2": _fraction,
    "epsilon": _epsilon,
    "amsgrad": _bool,
    "adaptive_epsilon": _bool,
}

_CLASS_CHECKS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "SGD": {"momentum": _closed_fraction, "nesterov": _bool},  # tf-keras raises outside [0, 1] too
    "RMSprop": {"rho": _fraction, "momentum": _fraction, "epsilon": _epsilon, "centered": _bool},
    "Adagrad": {"initial_accumulator_value": _real, "epsilon": _epsilon},
    "Adadelta": {"rho": _fraction, "epsilon": _epsilon},
    "Adam": _ADAM_ARGUMENTS,
    "AdamW": _ADAM_ARGUMENTS,
    "Adamax": {"beta_1": _fraction, "beta_2": _fraction, "epsilon": _epsilon},
    "Nadam": {"beta_1": _fraction, "beta_2": _fraction, "epsilon": _epsilon},
    "Ftrl": {  # tf-keras raises for the first five too
        "learning_rate_power": _non_positive,
        "initial_accumulator_value": _real,
        "l1_regularization_strength": _real,
        "l2_regularization_strength": _real,
        "l2_shrinkage_regularization_strength": _real,
        "beta": _real,
    },
    "Lion": {"beta_1": _lion_beta_1, "beta_2": _closed_fraction},
    "Adafactor": {
        "beta_2_decay": _non_positive,
        "epsilon_1": _epsilon,
        "epsilon_2": _epsilon,
        "clip_threshold": lambda path, value: float(_positive(path, value)),
        "relative_step": _bool,
    },
}
"""Each class's own arguments: how each is checked (the defaults are the `CONFIG_CLASSES` fields)."""

assert all(set(_CLASS_CHECKS[name]) == set(CLASS_ARGUMENTS[name]) for name in CONFIG_CLASSES)

_KERAS_3_KEYS = ("loss_scale_factor", "gradient_accumulation_steps")  # Keras 3's get_config() writes them, null

_HINTS = {
    "decay": "not an argument of the Keras 2.11+ optimizers; use a learning-rate schedule "
    "such as InverseTimeDecay instead",
    "lr": "not accepted (tf-keras ignores it silently); use learning_rate",
}

_SERIALIZED_KEYS = ("class_name", "config", "module", "registered_name")


def optimizer_class(name: Any, path: str = "optimizer") -> type[OptimizerConfig]:
    """The config class of a tf-keras optimizer class name ("RMSprop"; "keras.optimizers.RMSprop" too)."""
    name = _string(path, name)
    short = name.rsplit(">", 1)[-1].rsplit(".", 1)[-1]  # a registered name "keras>RMSprop" or a module path
    if short not in CONFIG_CLASSES:
        _fail(path, f"unknown optimizer {name!r}; known: {', '.join(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[short]


def parse_optimizer(raw: Mapping[str, Any], optimizer: str | None = None) -> OptimizerConfig:
    """A config from keyword arguments or `get_config()` (class `optimizer`, default Adam), or from Keras's
    serialized form ``{"class_name", "config", "module", "registered_name"}`` as
    `tf_keras.optimizers.serialize` or `keras.optimizers.serialize` writes it.

    A serialized form names its class; `optimizer`, when given too, must agree.
    """
    raw = _mapping("config", raw)
    if "class_name" in raw and "config" in raw:
        _check_keys("config", raw, _SERIALIZED_KEYS)
        for key in ("module", "registered_name"):
            _optional(_string)(f"config.{key}", raw.get(key))
        cls = optimizer_class(raw["class_name"], "config.class_name")
        if optimizer and optimizer_class(optimizer) is not cls:
            _fail("optimizer", f"is {optimizer!r}, but the serialized config is a {cls.class_name}")
        return parse_config(_mapping("config.config", raw["config"]), cls.class_name, "config.config")
    return parse_config(raw, optimizer_class(optimizer or "Adam").class_name)


def parse_config(raw: Mapping[str, Any], class_name: str = "Adam", path: str = "config") -> OptimizerConfig:
    """Validate a tf-keras optimizer config of class `class_name` and fill in that class's Keras defaults.

    Args:
      raw: `get_config()` output or a subset of the constructor's keyword
        arguments. `learning_rate` is a positive number or a schedule
        serialized as ``{"class_name", "config"}`` (optionally with "module"
        and "registered_name", as newer Keras writes it).
        `is_legacy_optimizer` may be present and must be false; Keras 3's
        `loss_scale_factor` and `gradient_accumulation_steps` must be null.
      class_name: the tf-keras class, e.g. "RMSprop".
      path: the field path that messages start with.

    Returns:
      The normalised config: `ema_overwrite_frequency` 0 becomes None.

    Raises:
      InvalidArgument: an unknown key, a wrong type (bools are not numbers),
        a value out of range, or a combination tf-keras would silently
        resolve: clipnorm with global_clipnorm, or clipvalue with either
        (tf-keras ignores clipvalue then); AdamW without weight_decay.
    """
    cls = optimizer_class(class_name, "optimizer")
    raw = _mapping(path, raw)
    for key in _HINTS.keys() & raw.keys():
        _fail(f"{path}.{key}", _HINTS[key])
    checks = {**_SHARED_ARGUMENTS, **_CLASS_CHECKS[cls.class_name]}
    _check_keys(path, raw, [*checks, "is_legacy_optimizer", *_KERAS_3_KEYS])
    if _bool(f"{path}.is_legacy_optimizer", raw.get("is_legacy_optimizer", False)):
        _fail(f"{path}.is_legacy_optimizer", "must be false; legacy (pre-2.11) optimizer configs are not supported")
    for key in _KERAS_3_KEYS:
        if raw.get(key) is not None:
            _fail(f"{path}.{key}", "must be null: optserve does not scale losses or accumulate gradients")
    values = {key: check(f"{path}.{key}", raw[key]) for key, check in checks.items() if key in raw}
    config = cls(**values)
    if config.clipnorm is not None and config.global_clipnorm is not None:
        _fail(f"{path}.clipnorm", "at most one of clipnorm and global_clipnorm can be set")
    if config.clipvalue is not None and (config.clipnorm is not None or config.global_clipnorm is not None):
        _fail(f"{path}.clipvalue", "cannot be combined with clipnorm or global_clipnorm (tf-keras would ignore it)")
    if cls is AdamWConfig and config.weight_decay is None:
        _fail(f"{path}.weight_decay", "AdamW needs a weight_decay (tf-keras raises for None)")
    return config
