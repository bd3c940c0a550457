"""Parsing tf-keras Adam configs: what Keras writes is accepted, anything dubious refused by field."""

import json
import re

import numpy as np
import pytest

from optserve.server.engine import AdamConfig, parse_config
from optserve.server.engine.schedules import CosineDecay, ExponentialDecay, PolynomialDecay
from optserve.server.errors import InvalidArgument
from tests.conformance_cases import case_names, load_case

# `tf_keras.optimizers.Adam().get_config()` (tf-keras 2.21, CPU: jit_compile was turned off).
GET_CONFIG_DEFAULT = {
    "name": "Adam",
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "jit_compile": False,
    "is_legacy_optimizer": False,
    "learning_rate": 0.0010000000474974513,
    "beta_1": 0.9,
    "beta_2": 0.999,
    "epsilon": 1e-07,
    "amsgrad": False,
}

# `Adam(ExponentialDecay(0.01, 1000, 0.9), weight_decay=0.004, global_clipnorm=1.0, use_ema=True,
# ema_overwrite_frequency=100, amsgrad=True).get_config()`: the schedule in the newer serialized form.
GET_CONFIG_SCHEDULE = {
    **GET_CONFIG_DEFAULT,
    "weight_decay": 0.004,
    "global_clipnorm": 1.0,
    "use_ema": True,
    "ema_overwrite_frequency": 100,
    "amsgrad": True,
    "learning_rate": {
        "module": "keras.optimizers.schedules",
        "class_name": "ExponentialDecay",
        "config": {
            "initial_learning_rate": 0.01,
            "decay_steps": 1000,
            "decay_rate": 0.9,
            "staircase": False,
            "name": None,
        },
        "registered_name": None,
    },
}

# `Adam(CosineDecay(0.0, 1000, warmup_target=0.001, warmup_steps=100), jit_compile=True).get_config()`.
GET_CONFIG_WARMUP = {
    **GET_CONFIG_DEFAULT,
    "jit_compile": True,
    "learning_rate": {
        "module": "keras.optimizers.schedules",
        "class_name": "CosineDecay",
        "config": {
            "initial_learning_rate": 0.0,
            "decay_steps": 1000,
            "alpha": 0.0,
            "name": None,
            "warmup_target": 0.001,
            "warmup_steps": 100,
        },
        "registered_name": None,
    },
}


def test_get_config_of_default_adam_is_accepted():
    config = parse_config(GET_CONFIG_DEFAULT)
    assert config == AdamConfig(learning_rate=0.0010000000474974513, jit_compile=False)


def test_get_config_with_serialized_schedule_is_accepted():
    config = parse_config(GET_CONFIG_SCHEDULE)
    assert config.learning_rate == ExponentialDecay(0.01, 1000, 0.9, staircase=False, name=None)
    assert (config.weight_decay, config.global_clipnorm, config.ema_overwrite_frequency) == (0.004, 1.0, 100)
    assert config.use_ema and config.amsgrad


def test_cosine_warmup_from_zero_is_accepted():
    config = parse_config(GET_CONFIG_WARMUP)
    assert config.learning_rate == CosineDecay(0.0, 1000, 0.0, None, warmup_target=0.001, warmup_steps=100)


def test_learning_rate_as_numpy_float32_is_accepted():
    """get_config() returns the lr variable's value, a numpy float32, before any JSON round trip."""
    config = parse_config({**GET_CONFIG_DEFAULT, "learning_rate": np.float32(0.001)})
    assert config.learning_rate == float(np.float32(0.001))


def test_schedule_in_plain_class_name_config_form_gets_defaults_filled():
    schedule = {"class_name": "PolynomialDecay", "config": {"initial_learning_rate": 0.1, "decay_steps": 10}}
    config = parse_config({"learning_rate": schedule})
    assert config.learning_rate == PolynomialDecay(0.1, 10, end_learning_rate=0.0001, power=1.0, cycle=False)


def test_ints_are_accepted_for_floats():
    config = parse_config({"learning_rate": 1, "epsilon": 0, "beta_1": 0, "ema_momentum": 1, "clipnorm": 2})
    got = (config.learning_rate, config.epsilon, config.beta_1, config.ema_momentum, config.clipnorm)
    assert got == (1.0, 0.0, 0.0, 1.0, 2.0)
    assert all(isinstance(value, float) for value in got)


def test_ema_overwrite_frequency_zero_means_never():
    assert parse_config({"use_ema": True, "ema_overwrite_frequency": 0}).ema_overwrite_frequency is None


def test_exclude_from_weight_decay_patterns_are_kept():
    config = parse_config({"weight_decay": 0.1, "exclude_from_weight_decay": ["bias", r"norm/\w+"]})
    assert config.exclude_from_weight_decay == ("bias", r"norm/\w+")
    assert parse_config({"exclude_from_weight_decay": None}).exclude_from_weight_decay == ()


@pytest.mark.parametrize("name", case_names())
def test_every_conformance_config_is_accepted(name):
    parse_config(load_case(name).config)


ROUND_TRIP = [GET_CONFIG_DEFAULT, GET_CONFIG_SCHEDULE, GET_CONFIG_WARMUP, *(load_case(n).config for n in case_names())]


@pytest.mark.parametrize("raw", ROUND_TRIP)
def test_to_keras_dict_round_trips_through_json_and_parse_config(raw):
    config = parse_config(raw)
    written = config.to_keras_dict()
    assert parse_config(json.loads(json.dumps(written))) == config
    if not isinstance(config.learning_rate, float):
        assert set(written["learning_rate"]) == {"class_name", "config"}


REFUSALS = [
    # (raw config, message start)
    ([0.1], "config: must be an object"),
    ({"foo": 1}, "config.foo: unknown key; allowed keys: adaptive_epsilon, amsgrad, beta_1"),
    ({"decay": 0.01}, "config.decay: not an argument"),
    ({"lr": 0.01}, "config.lr: not accepted"),
    ({"is_legacy_optimizer": True}, "config.is_legacy_optimizer: must be false"),
    ({"learning_rate": 0}, "config.learning_rate: must be > 0"),
    ({"learning_rate": -0.1}, "config.learning_rate: must be > 0"),
    ({"learning_rate": float("nan")}, "config.learning_rate: must be finite"),
    ({"learning_rate": float("inf")}, "config.learning_rate: must be finite"),
    ({"learning_rate": True}, "config.learning_rate: must be a number"),
    ({"learning_rate": 10**400}, "config.learning_rate: must be below 2**63 in magnitude"),
    ({"learning_rate": "0.1"}, "config.learning_rate: must be a number"),
    ({"learning_rate": None}, "config.learning_rate: must be a number"),
    ({"beta_1": 1.5}, "config.beta_1: must be in [0, 1), got 1.5"),
    ({"beta_1": 1}, "config.beta_1: must be in [0, 1)"),
    ({"beta_2": -0.1}, "config.beta_2: must be in [0, 1)"),
    ({"beta_2": False}, "config.beta_2: must be a number"),
    ({"epsilon": -1e-7}, "config.epsilon: must be >= 0"),
    ({"amsgrad": 1}, "config.amsgrad: must be true or false"),
    ({"adaptive_epsilon": "yes"}, "config.adaptive_epsilon: must be true or false"),
    ({"weight_decay": -0.1}, "config.weight_decay: must be >= 0"),
    ({"clipnorm": 0}, "config.clipnorm: must be > 0 or null"),
    ({"clipnorm": -1.0}, "config.clipnorm: must be > 0 or null"),
    ({"clipvalue": 0.0}, "config.clipvalue: must be > 0 or null"),
    ({"global_clipnorm": -1}, "config.global_clipnorm: must be > 0 or null"),
    ({"clipnorm": 1.0, "global_clipnorm": 1.0}, "config.clipnorm: at most one of clipnorm and global_clipnorm"),
    ({"clipnorm": 1.0, "clipvalue": 0.5}, "config.clipvalue: cannot be combined"),
    ({"global_clipnorm": 1.0, "clipvalue": 0.5}, "config.clipvalue: cannot be combined"),
    ({"ema_momentum": 1.5}, "config.ema_momentum: must be in [0, 1]"),
    ({"use_ema": True, "ema_momentum": -0.1}, "config.ema_momentum: must be in [0, 1]"),
    ({"ema_overwrite_frequency": -1}, "config.ema_overwrite_frequency: must be null or an integer in [1, 2**31)"),
    ({"ema_overwrite_frequency": 10.0}, "config.ema_overwrite_frequency: must be null or an integer in [1, 2**31)"),
    ({"ema_overwrite_frequency": True}, "config.ema_overwrite_frequency: must be null or an integer in [1, 2**31)"),
    ({"ema_overwrite_frequency": 2**31}, "config.ema_overwrite_frequency: must be null or an integer in [1, 2**31)"),
    ({"use_ema": "yes"}, "config.use_ema: must be true or false"),
    ({"jit_compile": None}, "config.jit_compile: must be true or false"),
    ({"name": 3}, "config.name: must be a string"),
    ({"exclude_from_weight_decay": "bias"}, "config.exclude_from_weight_decay: must be a list"),
    ({"exclude_from_weight_decay": ["ok", "("]}, "config.exclude_from_weight_decay[1]: is not a valid regular"),
    ({"exclude_from_weight_decay": [1]}, "config.exclude_from_weight_decay[0]: must be a string"),
]


def _schedule(class_name, **arguments):
    return {"learning_rate": {"class_name": class_name, "config": arguments}}


SCHEDULE_REFUSALS = [
    ({"learning_rate": {"config": {}}}, "config.learning_rate.class_name: missing"),
    ({"learning_rate": {"class_name": "ExponentialDecay"}}, "config.learning_rate.config: missing"),
    (
        {"learning_rate": {"class_name": "ExponentialDecay", "config": [], "x": 1}},
        "config.learning_rate.x: unknown key",
    ),
    (
        {"learning_rate": {"class_name": "ExponentialDecay", "config": [1]}},
        "config.learning_rate.config: must be an object",
    ),
    (
        {"learning_rate": {"class_name": "X", "config": {}, "module": 3}},
        "config.learning_rate.module: must be a string",
    ),
    (
        _schedule("LinearCosineDecay", initial_learning_rate=0.1, decay_steps=10),
        "config.learning_rate.class_name: unknown schedule 'LinearCosineDecay'; known: ExponentialDecay, Piecewise",
    ),
    (
        _schedule("ExponentialDecay", initial_learning_rate=0.1, decay_rate=0.9),
        "config.learning_rate.config.decay_steps: missing (required by ExponentialDecay)",
    ),
    (
        _schedule("ExponentialDecay", initial_learning_rate=0.1, decay_steps=0, decay_rate=0.9),
        "config.learning_rate.config.decay_steps: must be > 0",
    ),
    (
        _schedule("ExponentialDecay", initial_learning_rate=0.1, decay_steps=10, decay_rate=0.9, warmup_steps=1),
        "config.learning_rate.config.warmup_steps: unknown key",
    ),
    (
        _schedule("ExponentialDecay", initial_learning_rate=0.1, decay_steps=10, decay_rate=-0.9),
        "config.learning_rate.config.decay_rate: must be >= 0",
    ),
    (
        _schedule("ExponentialDecay", initial_learning_rate=0.1, decay_steps=10, decay_rate=0.9, staircase=0),
        "config.learning_rate.config.staircase: must be true or false",
    ),
    (
        _schedule("InverseTimeDecay", initial_learning_rate=float("nan"), decay_steps=10, decay_rate=0.5),
        "config.learning_rate.config.initial_learning_rate: must be finite",
    ),
    (
        _schedule("PolynomialDecay", initial_learning_rate=0.1, decay_steps=10, end_learning_rate=-1e-4),
        "config.learning_rate.config.end_learning_rate: must be >= 0",
    ),
    (
        _schedule("PiecewiseConstantDecay", boundaries=[10, 20], values=[1.0, 0.5]),
        "config.learning_rate.config.values: must have len(boundaries) + 1 = 3 entries, got 2",
    ),
    (
        _schedule("PiecewiseConstantDecay", boundaries=[20, 10], values=[1.0, 0.5, 0.1]),
        "config.learning_rate.config.boundaries: must be strictly increasing",
    ),
    (
        _schedule("PiecewiseConstantDecay", boundaries=[], values=[1.0]),
        "config.learning_rate.config.boundaries: must not be empty",
    ),
    (
        _schedule("PiecewiseConstantDecay", boundaries=[10], values=[1.0, -0.5]),
        "config.learning_rate.config.values[1]: must be >= 0",
    ),
    (
        _schedule("PiecewiseConstantDecay", boundaries=10, values=[1.0, 0.5]),
        "config.learning_rate.config.boundaries: must be a list",
    ),
    (
        _schedule("CosineDecay", initial_learning_rate=0.0, decay_steps=10, warmup_target=-0.1, warmup_steps=5),
        "config.learning_rate.config.warmup_target: must be >= 0",
    ),
    (
        _schedule("CosineDecay", initial_learning_rate=0.1, decay_steps=10, alpha=-0.1),
        "config.learning_rate.config.alpha: must be >= 0",
    ),
    (
        _schedule("CosineDecayRestarts", initial_learning_rate=0.1, first_decay_steps=-1),
        "config.learning_rate.config.first_decay_steps: must be > 0",
    ),
    (
        _schedule("CosineDecayRestarts", initial_learning_rate=0.1, first_decay_steps=10, t_mul=0.5),
        "config.learning_rate.config.t_mul: must be >= 1",
    ),
    (
        _schedule("CosineDecay", initial_learning_rate=0.1, decay_steps=10, name=3),
        "config.learning_rate.config.name: must be a string",
    ),
]


@pytest.mark.parametrize("raw, message", REFUSALS + SCHEDULE_REFUSALS, ids=[m for _, m in REFUSALS + SCHEDULE_REFUSALS])
def test_invalid_config_is_refused_naming_the_field(raw, message):
    with pytest.raises(InvalidArgument, match="^" + re.escape(message)):
        parse_config(raw)
