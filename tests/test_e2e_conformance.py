"""Every golden tf-keras case replayed through a real server and the client."""

import pytest

from optserve.client import Client
from tests.conformance_cases import assert_slots_and_final, case_names, load_case, replay_steps


@pytest.mark.parametrize("case_name", case_names())
def test_case_matches_tf_keras_through_the_server(client: Client, case_name: str) -> None:
    case = load_case(case_name)
    opt = client.create_optimizer(f"conformance-{case_name}", case.init, case.config)
    try:
        info = replay_steps(opt, case, lambda k, grads: opt.push(grads))
        assert_slots_and_final(opt, case, info.config["amsgrad"])
    finally:
        client.delete_optimizer(opt.name)
