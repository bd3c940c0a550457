"""Create-if-missing: racing workers make one optimizer, and one that disagrees is refused."""

import threading

import grpc
import numpy as np
import pytest

from optserve.client import Client, InvalidArgumentError, OptserveError
from tests.conftest import run_threads

PARAMS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
CONFIG = {"learning_rate": 0.01, "beta_1": 0.8}


def test_racing_workers_create_one_optimizer_and_all_attach(server, name: str) -> None:
    workers = 4
    barrier = threading.Barrier(workers, timeout=60)
    outcomes: list = [None] * workers

    def worker(index: int) -> None:
        with Client(server.address, timeout=60) as mine:
            barrier.wait()
            try:
                opt = mine.create_optimizer(name, PARAMS, CONFIG, if_exists="attach")
                outcomes[index] = opt.push({"w": np.ones((2, 3)), "b": np.ones(3)}, worker_id=f"w{index}", seq=0)
            except Exception as err:  # reported below
                outcomes[index] = err

    run_threads(worker, workers)
    with Client(server.address) as client:
        try:
            assert sorted(outcomes) == [1, 2, 3, 4], outcomes  # one optimizer took every worker's step
            assert client.optimizer(name).info().iterations == workers
        finally:
            client.delete_optimizer(name)


def test_attach_to_an_agreeing_optimizer_keeps_its_state(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, PARAMS, CONFIG, mode="sync", num_workers=2)
    try:
        other = {"w": np.zeros((2, 3)), "b": np.ones(3)}  # the values differ (the first worker's are kept)
        attached = client.create_optimizer(name, other, {"learning_rate": 0.01}, mode="sync", num_workers=2,
                                           if_exists="attach")
        assert attached.info().version == 0
        np.testing.assert_array_equal(attached.pull()["w"], PARAMS["w"])
    finally:
        client.delete_optimizer(name)


@pytest.mark.parametrize("params,config,options,fragment", [
    ({"w": np.zeros((3, 2)), "b": np.zeros(3)}, CONFIG, {}, "params['w']: shape (3, 2), the optimizer's is (2, 3)"),
    ({"w": np.zeros((2, 3))}, CONFIG, {}, "params: lacks the optimizer's tensor 'b'"),
    ({**PARAMS, "c": np.zeros(1)}, CONFIG, {}, "params['c']: the optimizer has no such tensor"),
    (PARAMS, {"learning_rate": 0.1}, {}, "config['learning_rate']: 0.1, the optimizer's is 0.01"),
    (PARAMS, CONFIG, {"mode": "sync", "num_workers": 2}, "mode: 'sync', the optimizer's is 'async'"),
    (PARAMS, CONFIG, {"max_staleness": 3}, "max_staleness: 3, the optimizer's is None"),
], ids=["shape", "fewer tensors", "more tensors", "config", "mode", "staleness"])
def test_attach_to_a_disagreeing_optimizer_is_already_exists(client: Client, name: str, params, config, options,
                                                             fragment) -> None:
    opt = client.create_optimizer(name, PARAMS, CONFIG)
    try:
        opt.push({"w": np.ones((2, 3)), "b": np.ones(3)})
        before = opt.pull()
        with pytest.raises(OptserveError) as caught:
            client.create_optimizer(name, params, config, if_exists="attach", **options)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert fragment in caught.value.details(), caught.value.details()
        after = opt.pull()
        assert after.version == before.version == 1
        for key in before:
            np.testing.assert_array_equal(after[key], before[key])
    finally:
        client.delete_optimizer(name)


def test_plain_create_of_a_taken_name_still_refuses(client: Client, name: str) -> None:
    client.create_optimizer(name, PARAMS)
    try:
        with pytest.raises(OptserveError) as caught:
            client.create_optimizer(name, PARAMS)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(InvalidArgumentError, match="if_exists: must be one of"):
            client.create_optimizer(name, PARAMS, if_exists="replace")
    finally:
        client.delete_optimizer(name)
