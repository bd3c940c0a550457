"""Non-trainable state (BatchNorm statistics) kept on the server: served with the weights, replaced by pushes, never
stepped; averaged over a sync round; durable."""

import io

import grpc
import numpy as np
import pytest

from optserve.client import Client, IndexedSlices, OptserveError
from optserve.server.launch import ServerProcess
from tests.conftest import RunningServer, run_threads

PARAMS = {"dense": {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)}}
STATE = {"bn": {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}}
GRADS = {"dense": {"w": np.full((2, 3), 0.5, np.float32)}}
CONFIG = {"learning_rate": 0.1, "use_ema": True}


def test_state_is_served_replaced_and_never_stepped(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, PARAMS, CONFIG, state=STATE)
    reference = client.create_optimizer(name + "-ref", PARAMS, CONFIG)  # the same optimizer without state
    try:
        assert opt.info().non_trainable == ("bn/mean", "bn/var")
        first = opt.pull()
        np.testing.assert_array_equal(first["bn/var"], STATE["bn"]["var"])
        new = {"bn": {"mean": np.array([1, 2, 3], np.float32), "var": np.array([4, 5, 6], np.float32)}}
        assert opt.push(GRADS, state=new) == 1
        reference.push(GRADS)
        pulled, ema = opt.pull(), opt.pull(ema=True)
        np.testing.assert_array_equal(pulled["bn/mean"], [1, 2, 3])
        np.testing.assert_array_equal(ema["bn/var"], [4, 5, 6])  # the EMA serves the current values too
        np.testing.assert_array_equal(pulled["dense/w"], reference.pull()["dense/w"])  # the step as without state
        assert not opt.pull_slot("m")["bn/mean"].any() and not opt.pull_slot("v")["bn/var"].any()
        opt.push(GRADS)  # a push without state values leaves them (even under missing "refuse")
        np.testing.assert_array_equal(opt.pull()["bn/mean"], [1, 2, 3])
        assert opt.info().iterations == 2
    finally:
        client.delete_optimizer(name)
        client.delete_optimizer(name + "-ref")


@pytest.mark.parametrize("call,code,fragment", [
    (lambda opt: opt.push({}, state={"bn": {"mean": np.ones(3)}}, missing="skip"), grpc.StatusCode.INVALID_ARGUMENT,
     "only non-trainable values"),
    (lambda opt: opt.push({**GRADS, "bn": {"mean": np.ones(2)}}), grpc.StatusCode.INVALID_ARGUMENT, "bn/mean"),
    (lambda opt: opt.push(GRADS, state={"bn": {"mean": np.array([1, np.nan, 0])}}), grpc.StatusCode.INVALID_ARGUMENT,
     "gradients['bn/mean']: contains NaN"),
    (lambda opt: opt.push(GRADS, state={"dense": {"w": np.ones((2, 3))}}), grpc.StatusCode.INVALID_ARGUMENT,
     "state['dense/w']: also in gradients"),
    (lambda opt: opt.push(GRADS, state={"bn": {"other": np.ones(3)}}), grpc.StatusCode.NOT_FOUND, "bn/other"),
    (lambda opt: opt.client.create_optimizer(opt.name + "x", PARAMS, state={"dense": {"w": np.ones(1)}}),
     grpc.StatusCode.INVALID_ARGUMENT, "state['dense/w']: a tensor of params has that path"),
    (lambda opt: opt.client.create_optimizer(opt.name + "x", {}, state=STATE), grpc.StatusCode.INVALID_ARGUMENT,
     "every tensor is non_trainable"),
], ids=["state only", "wrong shape", "NaN", "both gradient and value", "unknown", "path of params", "no params"])
def test_bad_state_is_refused_and_changes_nothing(client: Client, name: str, call, code, fragment) -> None:
    opt = client.create_optimizer(name, PARAMS, CONFIG, state=STATE)
    try:
        opt.push(GRADS, state={"bn": {"mean": np.full(3, 7, np.float32)}})
        before = opt.pull()
        with pytest.raises(OptserveError) as caught:
            call(opt)
        assert caught.value.code() == code and fragment in caught.value.details(), caught.value.details()
        after = opt.pull()
        assert after.version == before.version == 1
        for key in before:
            np.testing.assert_array_equal(after[key], before[key])
        assert name + "x" not in [o.name for o in client.list_optimizers()]
        with pytest.raises(OptserveError, match="takes a dense value"):
            opt.push({**GRADS, "bn": {"mean": IndexedSlices([0], np.ones((1,)))}})
    finally:
        client.delete_optimizer(name)


def test_sync_round_averages_the_values_its_pushes_carry(server: RunningServer, name: str) -> None:
    with Client(server.address) as client:
        client.create_optimizer(name, PARAMS, CONFIG, state=STATE, mode="sync", num_workers=3)
    sent = {0: {"mean": [3, 0, 0], "var": [1, 1, 1]}, 1: {"mean": [6, 3, 0], "var": [2, 2, 2]}, 2: None}
    errors = []

    def worker(index: int) -> None:
        with Client(server.address, timeout=60) as mine:
            values = sent[index]
            try:
                mine.optimizer(name).push(GRADS, worker_id=f"w{index}", seq=0, base_version=0,
                                          state=None if values is None else {"bn": {k: np.array(v, np.float32)
                                                                                   for k, v in values.items()}})
            except Exception as err:  # reported below
                errors.append(err)

    run_threads(worker, 3)
    with Client(server.address) as client:
        try:
            assert not errors, errors
            pulled = client.optimizer(name).pull()
            assert pulled.version == 1
            np.testing.assert_array_equal(pulled["bn/mean"], [4.5, 1.5, 0])  # worker 2 sent none: not a zero
            np.testing.assert_array_equal(pulled["bn/var"], [1.5, 1.5, 1.5])
        finally:
            client.delete_optimizer(name)


def test_state_survives_sigkill_through_the_log(tmp_path, name: str) -> None:
    values = {"bn": {"mean": np.array([1, 2, 3], np.float32), "var": np.array([4, 5, 6], np.float32)}}
    with ServerProcess(["--data-dir", str(tmp_path)], log=io.StringIO()) as first:
        with Client(first.address) as client:
            opt = client.create_optimizer(name, PARAMS, CONFIG, state=STATE)
            opt.push(GRADS, state=values, worker_id="w", seq=0)
            opt.push(GRADS, worker_id="w", seq=1)
            want = {k: v.copy() for k, v in opt.pull().items()}
        first.process.kill()  # no checkpoint: the next start replays the log
        first.process.wait(30)
    with ServerProcess(["--data-dir", str(tmp_path)], log=io.StringIO()) as restarted:
        with Client(restarted.address) as client:
            opt = client.optimizer(name)
            assert opt.info().non_trainable == ("bn/mean", "bn/var")
            got = opt.pull()
            assert got.version == 2
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
            assert opt.push(GRADS, worker_id="w", seq=0).duplicate  # exactly once across the replay


@pytest.mark.parametrize("optimizer,config", [("SGD", {"learning_rate": 0.1, "momentum": 0.9}),
                                              ("RMSprop", {"learning_rate": 0.01})])
def test_state_beside_another_class_is_kept_out_of_its_slots(client: Client, name: str, optimizer, config) -> None:
    opt = client.create_optimizer(name, PARAMS, config, optimizer=optimizer, state=STATE)
    reference = client.create_optimizer(name + "-ref", PARAMS, config, optimizer=optimizer)
    try:
        opt.push(GRADS, state={"bn": {"mean": np.full(3, 2, np.float32)}})
        reference.push(GRADS)
        pulled = opt.pull()
        np.testing.assert_array_equal(pulled["bn/mean"], [2, 2, 2])
        np.testing.assert_array_equal(pulled["bn/var"], STATE["bn"]["var"])
        np.testing.assert_array_equal(pulled["dense/w"], reference.pull()["dense/w"])
        for slot in opt.info().slots:
            assert not opt.pull_slot(slot, names=["bn/mean"])["bn/mean"].any(), slot
    finally:
        client.delete_optimizer(name)
        client.delete_optimizer(name + "-ref")
