"""Every golden tf-keras case replayed through a real server and the client."""

import numpy as np
import pytest

from optserve.client import Client
from tests.conformance_cases import assert_close, assert_state_after_step, case_names, load_case, wire_grads


@pytest.mark.parametrize("case_name", case_names())
def test_case_matches_tf_keras_through_the_server(client: Client, case_name: str) -> None:
    case = load_case(case_name)
    opt = client.create_optimizer(f"conformance-{case_name}", case.init, case.config)
    try:
        for k in range(case.steps):
            info = opt.info()
            assert info.iterations == k
            np.testing.assert_allclose(info.next_learning_rate, case.lr[k], rtol=1e-6, err_msg=f"lr at step {k + 1}")
            version = opt.push(wire_grads(case.grads[k]))
            assert version == k + 1
            weights = opt.pull()
            assert weights.version == k + 1 and weights.iterations == case.iterations[k]
            assert_state_after_step(opt, case, k)
        for slot in ("m", "v", "vhat"):
            if slot == "vhat" and not info.config["amsgrad"]:
                continue
            got = opt.pull_slot(slot)
            for var, slots in case.slots.items():
                assert_close(got[var], slots[slot], f"{case_name}: slot {slot} of {var}")
        opt.finalize()
        final = opt.pull()
        for var, want in case.final.items():
            assert_close(final[var], want, f"{case_name}: {var} after finalize")
    finally:
        client.delete_optimizer(opt.name)
