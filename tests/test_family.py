"""The tf-keras optimizer family on the one engine: golden trajectories, configs and serialized forms."""

import json

import numpy as np
import pytest

from optserve.server.engine import pipeline
from optserve.server.engine.config import CLASS_ARGUMENTS, CONFIG_CLASSES, parse_config, parse_optimizer
from optserve.server.errors import InvalidArgument
from tests.conformance_cases import Case, assert_close, family_case_names, load_case

FAMILY = family_case_names()


def _device_grads(grads: dict) -> dict:
    return {name: pipeline.sparse_grad(*g) if isinstance(g, tuple) else g for name, g in grads.items()}


def replay_in_engine(case: Case, jit_compile: bool) -> None:
    config = parse_config({**case.config, "jit_compile": jit_compile}, case.class_name)
    names = [name for name, _ in case.variables]
    state = pipeline.init(case.init, config)
    assert set(state.slots) == set(case.slot_names), (list(state.slots), case.slot_names)
    step = pipeline.make_step(config, names)
    for k in range(case.steps):
        what = f"{case.name} step {k + 1}"
        np.testing.assert_allclose(pipeline.learning_rate_at(config, k), case.lr[k], rtol=1e-5, atol=1e-12,
                                   err_msg=what)
        state = step(state, _device_grads(case.grads[k]))
        assert int(state.iterations) == case.iterations[k], what
        for name in names:
            assert_close(state.params[name], case.expect[k][name], f"{what} params[{name}]")
            if case.ema is not None:
                assert_close(state.ema[name], case.ema[k][name], f"{what} ema[{name}]")
    for name in names:
        for slot, want in case.slots[name].items():
            assert_close(state.slots[slot][name], want, f"{case.name} {slot}[{name}]")
    for key, want in case.state.items():
        assert_close(state.scalars[key], want, f"{case.name} state {key}")
    final = pipeline.finalize(state)
    for name in names:
        assert_close(final.params[name], case.final[name], f"{case.name} final[{name}]")


@pytest.mark.parametrize("name", FAMILY)
def test_jitted_engine_reproduces_every_tf_keras_class(name: str) -> None:
    replay_in_engine(load_case(name), jit_compile=True)


@pytest.mark.parametrize("name", ["sgd_nesterov", "rmsprop_sparse_dup", "adadelta_sparse_dup", "nadam_sparse_dup",
                                  "ftrl_power_shrinkage_beta", "lion_sparse_dup", "adafactor_defaults"])
def test_unjitted_engine_reproduces_tf_keras_too(name: str) -> None:
    replay_in_engine(load_case(name), jit_compile=False)


@pytest.mark.parametrize("name", FAMILY)
def test_defaults_are_each_class_own_as_keras_serializes_them(name: str) -> None:
    case = load_case(name)
    written = parse_config(case.config, case.class_name).to_keras_dict()
    want = dict(case.keras_config["config"])
    for key, value in want.items():
        if key in ("jit_compile", "learning_rate"):  # the cases ran eagerly; Keras writes lr rounded to float32
            continue
        got = written[key]
        assert got == value or (isinstance(value, float) and np.float32(got) == np.float32(value)), (key, got, value)
    assert set(written) - set(want) <= {"exclude_from_weight_decay", "adaptive_epsilon", "jit_compile"}


@pytest.mark.parametrize("name", FAMILY)
def test_the_serialized_form_is_accepted_as_it_is(name: str) -> None:
    case = load_case(name)
    config = parse_optimizer(json.loads(json.dumps(case.keras_config)))
    assert config.class_name == case.class_name
    assert parse_optimizer(case.keras_config, case.class_name) == config
    assert parse_optimizer(case.keras_config["config"], case.class_name) == config  # get_config() alone


@pytest.mark.parametrize("class_name", list(CONFIG_CLASSES))
def test_to_keras_dict_round_trips_for_every_class(class_name: str) -> None:
    config = parse_config({}, class_name)
    assert parse_config(json.loads(json.dumps(config.to_keras_dict())), class_name) == config
    assert list(CLASS_ARGUMENTS[class_name]) == [k for k in config.to_keras_dict() if k in CLASS_ARGUMENTS[class_name]]


def test_keras_3_serialize_output_is_accepted() -> None:
    """What `keras.optimizers.serialize(keras.optimizers.RMSprop())` writes in Keras 3."""
    keras_3 = {"module": "keras.optimizers", "class_name": "RMSprop", "registered_name": None, "config": {
        "name": "rmsprop", "learning_rate": 0.0010000000474974513, "weight_decay": None, "clipnorm": None,
        "global_clipnorm": None, "clipvalue": None, "use_ema": False, "ema_momentum": 0.99,
        "ema_overwrite_frequency": None, "loss_scale_factor": None, "gradient_accumulation_steps": None,
        "rho": 0.9, "momentum": 0.0, "epsilon": 1e-07, "centered": False}}
    config = parse_optimizer(keras_3)
    assert config.class_name == "RMSprop" and config.ema_overwrite_frequency is None and config.rho == 0.9


REFUSALS = [
    # (class, raw config, message start)
    ("SGD", {"momentum": 1.5}, "config.momentum: must be in [0, 1]"),
    ("SGD", {"nesterov": 1}, "config.nesterov: must be true or false"),
    ("SGD", {"beta_1": 0.9}, "config.beta_1: unknown key"),
    ("RMSprop", {"rho": 1.0}, "config.rho: must be in [0, 1)"),
    ("RMSprop", {"momentum": -0.1}, "config.momentum: must be in [0, 1)"),
    ("RMSprop", {"epsilon": -1}, "config.epsilon: must be >= 0"),
    ("Adagrad", {"initial_accumulator_value": -0.1}, "config.initial_accumulator_value: must be >= 0"),
    ("Adadelta", {"rho": -0.5}, "config.rho: must be in [0, 1)"),
    ("Adamax", {"beta_2": 1}, "config.beta_2: must be in [0, 1)"),
    ("Nadam", {"beta_1": "0.9"}, "config.beta_1: must be a number"),
    ("Ftrl", {"learning_rate_power": 0.5}, "config.learning_rate_power: must be <= 0"),
    ("Ftrl", {"l1_regularization_strength": -1}, "config.l1_regularization_strength: must be >= 0"),
    ("Ftrl", {"beta": -1}, "config.beta: must be >= 0"),
    ("AdamW", {"weight_decay": None}, "config.weight_decay: AdamW needs a weight_decay"),
    ("Lion", {"beta_1": 0}, "config.beta_1: must be in (0, 1]"),
    ("Lion", {"beta_2": 1.5}, "config.beta_2: must be in [0, 1]"),
    ("Adafactor", {"clip_threshold": 0}, "config.clip_threshold: must be > 0"),
    ("Adafactor", {"beta_2_decay": 0.8}, "config.beta_2_decay: must be <= 0"),
    ("Adafactor", {"relative_step": "yes"}, "config.relative_step: must be true or false"),
    ("Adam", {"loss_scale_factor": 128.0}, "config.loss_scale_factor: must be null"),
]


@pytest.mark.parametrize("class_name, raw, message", REFUSALS)
def test_each_class_refuses_bad_arguments_naming_the_field(class_name: str, raw: dict, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_config(raw, class_name)
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize("raw, optimizer, message", [
    ({}, "Sgd", "optimizer: unknown optimizer 'Sgd'"),
    ({"class_name": "Nope", "config": {}}, None, "config.class_name: unknown optimizer 'Nope'"),
    ({"class_name": "SGD", "config": {}}, "Adam", "optimizer: is 'Adam', but the serialized config is a SGD"),
    ({"class_name": "SGD", "config": {}, "extra": 1}, None, "config.extra: unknown key"),
    ({"class_name": "SGD", "config": {"rho": 1}}, None, "config.config.rho: unknown key"),
])
def test_choosing_the_class_refuses_what_does_not_name_one(raw: dict, optimizer, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_optimizer(raw, optimizer)
    assert str(caught.value).startswith(message), str(caught.value)


RNG = np.random.default_rng(3)
WHOLE = {"a": RNG.normal(size=(6, 4)).astype(np.float32), "b": RNG.normal(size=5).astype(np.float32)}
GRADS = [{"a": RNG.normal(size=(6, 4)).astype(np.float32) * 3, "b": RNG.normal(size=5).astype(np.float32) * 3}
         for _ in range(3)]


def _split_run(config: dict, own: dict, grads: list[dict], extra=lambda k: None) -> dict:
    """`own`'s tensors stepped alone on `grads`, with `extra(k)` the other shards' NormInputs at step k."""
    parsed = parse_config(config)
    state = pipeline.init(own, parsed)
    step = pipeline.make_step(parsed, list(own))
    for k, g in enumerate(grads):
        state = step(state, {n: g[n] for n in own}, extra(k))
    return {n: np.asarray(state.params[n]) for n in own}


def test_norm_inputs_make_global_clipnorm_span_the_other_shards() -> None:
    config = {"learning_rate": 0.1, "global_clipnorm": 1.0}
    whole = _split_run(config, WHOLE, GRADS)
    mine = {"a": WHOLE["a"]}
    shard = _split_run(config, mine, GRADS, lambda k: pipeline.NormInputs(total=float(np.sum(GRADS[k]["b"] ** 2))))
    np.testing.assert_allclose(shard["a"], whole["a"], rtol=2e-6, atol=1e-7)
    zeros = _split_run(config, mine, GRADS, lambda k: pipeline.NormInputs())  # zeros: as without
    np.testing.assert_array_equal(zeros["a"], _split_run(config, mine, GRADS)["a"])
    assert not np.allclose(zeros["a"], whole["a"])


def test_norm_inputs_make_clipnorm_span_a_tensor_split_by_rows() -> None:
    config = {"learning_rate": 0.1, "clipnorm": 1.0}
    whole = _split_run(config, WHOLE, GRADS)
    rows = {"a": WHOLE["a"][:4], "b": WHOLE["b"]}
    shard_grads = [{"a": g["a"][:4], "b": g["b"]} for g in GRADS]
    others = lambda k: pipeline.NormInputs(per_tensor=np.array([np.sum(GRADS[k]["a"][4:] ** 2), 0.0], np.float32))  # noqa: E731
    shard = _split_run(config, rows, shard_grads, others)
    np.testing.assert_allclose(shard["a"], whole["a"][:4], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(shard["b"], whole["b"], rtol=2e-6, atol=1e-7)
    parsed = parse_config(config)
    with pytest.raises(InvalidArgument, match=r"norm_inputs.per_tensor: must have shape \(2,\)"):
        pipeline.make_step(parsed, ["a", "b"])(pipeline.init(rows, parsed), {"b": GRADS[0]["b"]},
                                                pipeline.NormInputs(per_tensor=np.zeros(3, np.float32)))


@pytest.mark.parametrize("class_name", list(CONFIG_CLASSES))
def test_a_tensor_without_gradient_is_left_as_tf_keras_leaves_it_in_every_class(class_name: str) -> None:
    """The present tensors step as an optimizer of them alone would; the absent one moves by no bit."""
    config = parse_config({"use_ema": True, "ema_overwrite_frequency": 2}, class_name)
    params = {"a": WHOLE["a"], "b": WHOLE["b"], "e": np.ones((4, 3), np.float32)}
    step = pipeline.make_step(config, list(params))
    state = step(pipeline.init(params, config), {**GRADS[0], "e": np.full((4, 3), 0.5, np.float32)})
    before = pipeline.export(state)
    sub = pipeline.restore(1, {slot: {n: v for n, v in tensors.items() if n != "b"} for slot, tensors in before.items()},
                           pipeline.export_scalars(state))
    partial = {"a": GRADS[1]["a"], "e": pipeline.sparse_grad(np.array([0, 2, 2]), np.ones((3, 3), np.float32))}
    after = pipeline.export(step(state, partial))
    want = pipeline.export(pipeline.make_step(config, ["a", "e"])(sub, partial))
    for slot in after:
        if "b" in before[slot]:
            np.testing.assert_array_equal(after[slot]["b"], before[slot]["b"], err_msg=f"{slot}/b moved")
        for name in want[slot]:
            np.testing.assert_allclose(after[slot][name], want[slot][name], rtol=1e-6, atol=1e-7,
                                       err_msg=f"{slot}/{name}")
