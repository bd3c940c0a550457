"""Every golden tf-keras case replayed through a real server and the client."""

import pytest

from optserve.client import Client, IndexedSlices
from tests.conformance_cases import (
    Case,
    assert_close,
    assert_slots_and_final,
    case_names,
    family_case_names,
    load_case,
    replay_steps,
)


def _replay(client: Client, case: Case) -> None:
    """Weights and EMA after every step, the slots after the last, the weights after finalize."""
    opt = client.create_optimizer(f"conformance-{case.name}", case.init, case.config, optimizer=case.class_name)
    try:
        replay_steps(opt, case, lambda k, grads: opt.push(grads))
        assert_slots_and_final(opt, case)
    finally:
        client.delete_optimizer(opt.name)


@pytest.mark.parametrize("case_name", case_names())
def test_case_matches_tf_keras_through_the_server(client: Client, case_name: str) -> None:
    _replay(client, load_case(case_name))


@pytest.mark.parametrize("case_name", family_case_names())
def test_family_case_matches_tf_keras_through_the_server(client: Client, case_name: str) -> None:
    _replay(client, load_case(case_name))


@pytest.mark.parametrize("case_name", ["rmsprop_centered_momentum", "ftrl_l1_l2", "adafactor_defaults"])
def test_the_keras_serialized_form_creates_the_same_optimizer(client: Client, case_name: str) -> None:
    """`tf_keras.optimizers.serialize(opt)` as it is: the class comes from it, the trajectory is the case's."""
    case = load_case(case_name)
    keras_config = {**case.keras_config, "config": {**case.keras_config["config"], "learning_rate":
                                                    case.config.get("learning_rate", 0.001)}}
    opt = client.create_optimizer(f"serialized-{case_name}", case.init, keras_config)
    try:
        assert opt.info().optimizer == case.class_name
        for k in range(case.steps):
            opt.push({name: IndexedSlices(*g) if isinstance(g, tuple) else g for name, g in case.grads[k].items()})
        weights = opt.pull()
        for var, want in case.expect[-1].items():
            assert_close(weights[var], want, f"{case_name}: {var} after the last step")
    finally:
        client.delete_optimizer(opt.name)
