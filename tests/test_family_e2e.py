"""The family through the real server: bad input per class, sync, exactly-once, SIGKILL and restore, old data dirs.

A representative set: Ftrl and Adagrad (sparse-specific state: accumulators
that start at `initial_accumulator_value`, sparse rows), Nadam (its
optimizer-wide `u_product`) and Adafactor (factored slots of other shapes).
"""

import io
import signal
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from optserve.client import Client, IndexedSlices
from optserve.server.launch import ServerProcess
from tests.test_bad_input import assert_same_state, expect_error
from tests.test_durability import free_port
from tests.test_durability_attacks import rewrite_as_format_1

INIT = {"emb": np.linspace(-1, 1, 24, dtype=np.float32).reshape(8, 3), "w": np.full((3, 4), 0.5, np.float32),
        "b": np.array([0.1, -0.2, 0.3], np.float32)}
CLASSES = {  # class -> config: each with its own non-default arguments, weight decay and an EMA
    "Ftrl": {"learning_rate": 0.1, "l1_regularization_strength": 0.01, "l2_shrinkage_regularization_strength": 0.1,
             "use_ema": True},
    "Adagrad": {"learning_rate": 0.1, "initial_accumulator_value": 0.5, "weight_decay": 0.01},
    "Nadam": {"learning_rate": 0.01, "beta_1": 0.8, "use_ema": True, "ema_overwrite_frequency": 3},
    "Adafactor": {"learning_rate": 0.05, "relative_step": False, "global_clipnorm": 1.0},
}
SLOTS = {"Ftrl": ["accumulator", "linear"], "Adagrad": ["accumulator"], "Nadam": ["m", "v"],
         "Adafactor": ["r", "c", "v"]}


def grads(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"emb": IndexedSlices(rng.integers(0, 8, 4), rng.normal(size=(4, 3)).astype(np.float32)),
            "w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}


def dense(seed: int) -> dict:
    """`grads(seed)` with the sparse rows summed into place (what a sync round of dense pushes carries)."""
    g = grads(seed)
    emb = np.zeros((8, 3), np.float32)
    np.add.at(emb, g["emb"].indices, g["emb"].values)
    return {**g, "emb": emb}


def state_of(opt, class_name: str) -> dict:
    """Everything pullable: counters, weights, EMA (when kept) and every slot of the class."""
    info = opt.info()
    state = {"iterations": info.iterations, "version": info.version}
    kinds = [("weights", opt.pull())] + ([("ema", opt.pull(ema=True))] if info.config["use_ema"] else [])
    kinds += [(slot, opt.pull_slot(slot)) for slot in SLOTS[class_name]]
    for kind, pulled in kinds:
        for name, array in pulled.items():
            state[f"{kind}/{name}"] = array.copy()
    return state


@pytest.mark.parametrize("class_name", list(CLASSES))
def test_info_reports_the_class_its_defaults_and_its_slots(client: Client, name: str, class_name: str) -> None:
    opt = client.create_optimizer(name, INIT, CLASSES[class_name], optimizer=class_name)
    info = opt.info()
    assert info.optimizer == class_name and list(info.slots) == SLOTS[class_name]
    assert info.config["name"] == class_name
    if class_name == "Adafactor":  # factored: rows and columns of the tensors of rank >= 2 only
        r, c = opt.pull_slot("r"), opt.pull_slot("c")
        assert {k: v.shape for k, v in r.items()} == {"emb": (8,), "w": (3,)}
        assert {k: v.shape for k, v in c.items()} == {"emb": (3,), "w": (4,)}
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "names['b']: slot 'r' exists for tensors of rank >= 2",
                     opt.pull_slot, "r", names=["b"])
    if class_name in ("Ftrl", "Adagrad"):
        np.testing.assert_array_equal(opt.pull_slot("accumulator")["w"], np.full((3, 4), 0.5 if class_name ==
                                                                                  "Adagrad" else 0.1, np.float32))


def test_bad_classes_and_arguments_are_refused_naming_the_field(client: Client, name: str) -> None:
    before = {info.name for info in client.list_optimizers()}
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "optimizer: unknown optimizer 'AdaGrad'",
                 client.create_optimizer, name, INIT, {}, optimizer="AdaGrad")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "config.l1_regularization_strength: must be >= 0",
                 client.create_optimizer, name, INIT, {"l1_regularization_strength": -1}, optimizer="Ftrl")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "config.beta_1: unknown key",
                 client.create_optimizer, name, INIT, {"beta_1": 0.9}, optimizer="Adagrad")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "optimizer: is 'Adam', but the serialized config is a SGD",
                 client.create_optimizer, name, INIT, {"class_name": "SGD", "config": {}}, optimizer="Adam")
    assert {info.name for info in client.list_optimizers()} == before


def test_a_slot_the_class_lacks_is_a_failed_precondition(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, INIT, {"momentum": 0.0}, optimizer="RMSprop")
    expect_error(grpc.StatusCode.FAILED_PRECONDITION, "has no slot 'momentum'", opt.pull_slot, "momentum")
    expect_error(grpc.StatusCode.FAILED_PRECONDITION, "has no slot 'm'", opt.pull_slot, "m")
    assert set(opt.pull_slot("velocity")) == set(INIT)


def test_refuse_keeps_a_non_adam_state_finite(client: Client, name: str) -> None:
    """Adagrad with no epsilon and an empty accumulator: a zero gradient is 0 / 0 = NaN in Keras."""
    opt = client.create_optimizer(name, INIT, {"initial_accumulator_value": 0.0, "epsilon": 0.0}, optimizer="Adagrad")
    before = state_of(opt, "Adagrad")
    zero = {k: np.zeros_like(v) for k, v in INIT.items()}
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "would make the optimizer's state non-finite", opt.push, zero)
    assert_same_state(before, state_of(opt, "Adagrad"))
    opt.push({k: np.full_like(v, 0.5) for k, v in INIT.items()})  # a gradient everywhere goes through
    assert opt.info().iterations == 1


@pytest.mark.parametrize("class_name", list(CLASSES))
def test_exactly_once_and_sync_rounds_hold_for_the_class(client: Client, name: str, class_name: str) -> None:
    config = CLASSES[class_name]
    sync = client.create_optimizer(name, INIT, config, optimizer=class_name, mode="sync", num_workers=2)
    ref = client.create_optimizer(name + "-ref", INIT, config, optimizer=class_name)
    try:
        for round_ in range(3):
            errors = []

            def push(worker: str, seed: int) -> None:
                try:
                    sync.push(dense(seed), worker_id=worker, seq=round_, base_version=round_)
                except Exception as err:  # reported below
                    errors.append(err)

            threads = [threading.Thread(target=push, args=(w, 10 * round_ + i)) for i, w in enumerate("ab")]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert not errors, errors
            a, b = dense(10 * round_), dense(10 * round_ + 1)
            ref.push({k: (a[k] + b[k]) / np.float32(2) for k in a})
        assert_same_state(state_of(ref, class_name), state_of(sync, class_name))
        again = sync.push(dense(20), worker_id="a", seq=2, base_version=2)  # a retry of round 3's push
        assert again.duplicate and int(again) == 3
        assert_same_state(state_of(ref, class_name), state_of(sync, class_name))
    finally:
        client.delete_optimizer(ref.name)


def test_sigkill_and_restore_are_bit_for_bit_for_every_kind_of_state(tmp_path: Path) -> None:
    """Checkpoints hold the class, its slots (Adafactor's factors) and scalars (Nadam's u_product); the log replays."""
    port, log = free_port(), io.StringIO()
    args = ["--port", str(port), "--data-dir", str(tmp_path / "data"), "--checkpoint-every", "4"]
    process = ServerProcess(args, log=log)
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            for class_name, config in CLASSES.items():
                opt = client.create_optimizer(class_name.lower(), INIT, config, optimizer=class_name)
                for seq in range(6):  # checkpoints after 4 steps, then two steps only in the log
                    opt.push(grads(seq), worker_id="w", seq=seq)
                opt.push({"w": dense(9)["w"]}, missing="skip")
            want = {c: state_of(client.optimizer(c.lower()), c) for c in CLASSES}
        process.process.send_signal(signal.SIGKILL)
        process.process.wait(timeout=30)
        process = ServerProcess(args, log=log)
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            for class_name in CLASSES:
                opt = client.optimizer(class_name.lower())
                assert opt.info().optimizer == class_name
                assert_same_state(want[class_name], state_of(opt, class_name))
                assert opt.push(grads(5), worker_id="w", seq=5).duplicate  # the dedup table came back too
            # and the restored Nadam goes on exactly as one that never stopped (u_product restored)
            nadam = client.optimizer("nadam")
            fresh = client.create_optimizer("nadam-fresh", INIT, CLASSES["Nadam"], optimizer="Nadam")
            for seq in range(6):
                fresh.push(grads(seq))
            fresh.push({"w": dense(9)["w"]}, missing="skip")
            nadam.push(grads(7))
            fresh.push(grads(7))
            got, expected = state_of(nadam, "Nadam"), state_of(fresh, "Nadam")
            assert_same_state(expected, got)
    finally:
        process.stop()


def test_an_adam_data_dir_from_before_the_family_still_restores(tmp_path: Path) -> None:
    """A checkpoint as the server wrote it before the family: meta without "optimizer" and "scalars", a config
    without `adaptive_epsilon`, archive format 1. It restores as the Adam it was, and steps on as one."""
    port = free_port()
    data_dir = tmp_path / "data"
    args = ["--port", str(port), "--data-dir", str(data_dir)]
    process = ServerProcess(args, log=io.StringIO())
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            opt = client.create_optimizer("old", INIT, {"amsgrad": True})
            opt.push(grads(1))
            opt.save()
            want = adam_state(opt)
            twin = client.create_optimizer("twin", INIT, {"amsgrad": True})
            twin.push(grads(1))
            twin.push(grads(2))
            after = adam_state(twin)
        assert process.stop() == 0

        def before_the_family(meta: dict) -> dict:
            meta = {k: v for k, v in meta.items() if k not in ("optimizer", "scalars")}
            return {**meta, "config": {k: v for k, v in meta["config"].items() if k != "adaptive_epsilon"}}

        rewrite_as_format_1(data_dir / "old", before_the_family)
        process = ServerProcess(args, log=io.StringIO())
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            opt = client.optimizer("old")
            assert opt.info().optimizer == "Adam" and list(opt.info().slots) == ["m", "v", "vhat"]
            assert_same_state(want, adam_state(opt))
            opt.push(grads(2))
            assert_same_state(after, adam_state(opt))
    finally:
        process.stop()


def adam_state(opt) -> dict:
    return {"iterations": opt.info().iterations, **{f"weights/{k}": v for k, v in opt.pull().items()},
            **{f"{s}/{k}": v for s in ("m", "v", "vhat") for k, v in opt.pull_slot(s).items()}}
