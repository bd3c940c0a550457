"""exclude_from_weight_decay: re.search's answers at a bounded cost, and a server that stays up meanwhile."""

import re
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.client import Client
from optserve.server import patterns
from optserve.server.errors import InvalidArgument
from optserve.server.launch import ServerProcess
from optserve.server.options import ServerOptions
from tests.conftest import RunningServer
from tests.test_bad_input import expect_error

CATASTROPHIC = "(a+)+$"
NAMES = [
    "dense/kernel:0", "dense/bias:0", "dense_1/kernel", "dense_12/kernel:0", "dense_x/kernel", "LayerNorm/gamma",
    "encoder/layer_3/LayerNorm/beta", "bert/embeddings/word_embeddings", "token_embed", "embedding",
    "conv2d/bias", "bias", "Bias", "a+b", "a.b", "axb", "dense.bias", "dense-bias", "x[0]", "x0", "", "é/bias",
    "block_1/norm", "unembed/w",
]
ORDINARY = [["bias"], ["LayerNorm|bias"], [r"^dense_\d+/kernel"], [".*embed.*"], [r"bias:\d$", "norm"],
            ["a+b"], ["a.b"], [r"x\[0\]"], ["^$"], [""], ["(?i)BIAS"], ["é"], ["dense-bias", "^block"]]


@pytest.mark.parametrize("exclude", ORDINARY, ids=[",".join(p) or "empty" for p in ORDINARY])
def test_excluded_names_are_exactly_re_search(exclude: list[str]) -> None:
    want = {name for name in NAMES if any(re.search(pattern, name) for pattern in exclude)}
    assert patterns.excluded_names(exclude, NAMES) == want


def test_literal_with_regex_metacharacters_keeps_regex_meaning() -> None:
    """'a.b' is a regex (any character between), 'a+b' too (one or more a): both go the bounded way."""
    assert patterns.excluded_names(["a.b"], ["axb", "a.b", "ab"]) == {"axb", "a.b"}
    assert patterns.excluded_names(["a+b"], ["aab", "a+b", "b"]) == {"aab"}


def test_catastrophic_pattern_is_refused_naming_its_index() -> None:
    with pytest.raises(InvalidArgument, match=r"^config\.exclude_from_weight_decay\[1\]: .*longer than 0\.5 s"):
        patterns.excluded_names(["bias", CATASTROPHIC], ["w", "a" * 30 + "!"], timeout=0.5)


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_catastrophic_pattern_is_refused_while_the_server_stays_answering() -> None:
    """A real server process: the create is refused with INVALID_ARGUMENT; health answers throughout."""
    with ServerProcess() as server, Client(server.address, timeout=120) as client:
        outcome: list = []

        def create() -> None:
            try:
                client.create_optimizer("evil", {"a" * 30 + "!": np.ones(2, np.float32), "w": np.ones(2, np.float32)},
                                        {"weight_decay": 0.1, "exclude_from_weight_decay": ["bias", CATASTROPHIC]})
                outcome.append("created")
            except Exception as err:  # noqa: BLE001 - the test inspects it below
                outcome.append(err)

        worker = threading.Thread(target=create)
        worker.start()
        answered_during = 0
        for _ in range(200):  # bounded: the create ends within the match budget (or the loop does)
            alive = worker.is_alive()
            assert _health(server.address) == health_pb2.HealthCheckResponse.SERVING
            if not alive:
                break
            answered_during += worker.is_alive()
            time.sleep(0.05)
        worker.join(timeout=120)
        assert answered_during >= 1  # a health check started and finished while the create was in flight
        assert len(outcome) == 1 and not isinstance(outcome[0], str), outcome
        assert outcome[0].code() == grpc.StatusCode.INVALID_ARGUMENT, outcome[0]
        assert "config.exclude_from_weight_decay[1]" in outcome[0].details()
        assert client.list_optimizers() == []


def test_restore_reuses_the_names_matched_at_create(tmp_path, monkeypatch) -> None:
    """A restart does not match the patterns again: the checkpoint keeps the names they excluded."""
    options = ServerOptions(host="127.0.0.1", port=0, data_dir=str(tmp_path))
    params = {"dense/kernel": np.full(3, 2.0, np.float32), "dense/bias": np.full(3, 2.0, np.float32)}
    config = {"learning_rate": 1.0, "weight_decay": 0.5, "exclude_from_weight_decay": [r"bias$"]}
    zero = {name: np.zeros(3, np.float32) for name in params}
    first = RunningServer(options)
    with Client(first.address, timeout=60) as client:
        client.create_optimizer("wd", params, config).push(zero)
    first.stop()

    def no_matching(*args, **kwargs):
        raise AssertionError("the patterns were matched again on restore")

    monkeypatch.setattr(patterns, "_search_in_child", no_matching)
    second = RunningServer(options)
    try:
        with Client(second.address, timeout=60) as client:
            opt = client.optimizer("wd")
            opt.push(zero)
            weights = opt.pull()
        np.testing.assert_array_equal(weights["dense/bias"], params["dense/bias"])  # excluded: never decayed
        np.testing.assert_allclose(weights["dense/kernel"], 2.0 * 0.5 * 0.5)  # decayed twice by wd * lr = 0.5
    finally:
        second.stop()


def test_invalid_or_oversized_patterns_are_refused(client: Client, name: str) -> None:
    for exclude, fragment in [(["(" * 600 + ")" * 600], "exclude_from_weight_decay[0]: at most 1024 characters"),
                              (["(" * 500 + ")" * 500], "exclude_from_weight_decay[0]: is not a valid regular"),
                              (["x"] * 257, "exclude_from_weight_decay: at most 256 patterns")]:
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, fragment, client.create_optimizer, name,
                     {"w": np.ones(2, np.float32)}, {"weight_decay": 0.1, "exclude_from_weight_decay": exclude})
