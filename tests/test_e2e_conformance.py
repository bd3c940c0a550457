"""Every golden tf-keras case replayed through a real server and the client."""

import numpy as np
import pytest

from optserve.client import Client, IndexedSlices
from tests.conformance_cases import Case, assert_close, case_names, family_case_names, load_case


def _wire_grads(step_grads: dict) -> dict:
    return {
        name: IndexedSlices(indices=grad[0], values=grad[1]) if isinstance(grad, tuple) else grad
        for name, grad in step_grads.items()
    }


def _replay(client: Client, case: Case) -> None:
    """Weights and EMA after every step, the slots after the last, the weights after finalize."""
    opt = client.create_optimizer(f"conformance-{case.name}", case.init, case.config, optimizer=case.class_name)
    try:
        assert opt.info().optimizer == case.class_name and set(opt.info().slots) == set(case.slot_names)
        for k in range(case.steps):
            info = opt.info()
            assert info.iterations == k
            np.testing.assert_allclose(info.next_learning_rate, case.lr[k], rtol=1e-6, err_msg=f"lr at step {k + 1}")
            version = opt.push(_wire_grads(case.grads[k]))
            assert version == k + 1
            weights = opt.pull()
            assert weights.version == k + 1 and weights.iterations == case.iterations[k]
            for var, want in case.expect[k].items():
                assert_close(weights[var], want, f"{case.name}: {var} after step {k + 1}")
            if case.has_ema:
                ema = opt.pull(ema=True)
                assert ema.version == k + 1
                for var, want in case.ema[k].items():
                    assert_close(ema[var], want, f"{case.name}: EMA of {var} after step {k + 1}")
        for slot in case.slot_names:
            got = opt.pull_slot(slot)
            assert set(got) == {var for var, slots in case.slots.items() if slot in slots}
            for var, slots in case.slots.items():
                if slot in slots:  # Adafactor's r and c: tensors of rank >= 2 only
                    assert_close(got[var], slots[slot], f"{case.name}: slot {slot} of {var}")
        opt.finalize()
        final = opt.pull()
        for var, want in case.final.items():
            assert_close(final[var], want, f"{case.name}: {var} after finalize")
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
            opt.push(_wire_grads(case.grads[k]))
        weights = opt.pull()
        for var, want in case.expect[-1].items():
            assert_close(weights[var], want, f"{case_name}: {var} after the last step")
    finally:
        client.delete_optimizer(opt.name)
