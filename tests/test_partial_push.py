"""Pushes that leave tensors out (`missing="skip"`): tf-keras's treatment of a variable whose gradient is None.

tf-keras's `apply_gradients` drops (None, var) pairs before anything else: the
variable gets no clipping share, no weight decay, no `update_step`, no EMA
update or overwrite, and its slots stay as they are; `iterations` still goes up
by one for the call. The oracle here is an optimizer that holds only the
tensors that have a gradient: the present tensors must match it exactly, the
others must not move by a bit.
"""

import io
import signal
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from optserve.client import Client, IndexedSlices, InvalidArgumentError
from optserve.server.engine import parse_config, pipeline
from optserve.server.launch import ServerProcess
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.chunks import encode_stream
from tests.test_bad_input import assert_same_state, expect_error, snapshot
from tests.test_durability import free_port

CONFIG = {"learning_rate": 0.05, "amsgrad": True, "use_ema": True, "ema_momentum": 0.9,
          "ema_overwrite_frequency": 1, "weight_decay": 0.1, "global_clipnorm": 0.5}
RNG = np.random.default_rng(7)
INIT = {"w": RNG.normal(size=(3, 4)).astype(np.float32), "b": RNG.normal(size=(5,)).astype(np.float32),
        "emb": RNG.normal(size=(6, 2)).astype(np.float32)}


def grads(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32),
            "emb": IndexedSlices(np.array([1, 1, 4]), rng.normal(size=(3, 2)).astype(np.float32))}


def _engine(g: dict) -> dict:
    return {k: pipeline.sparse_grad(v.indices, v.values) if isinstance(v, IndexedSlices) else v for k, v in g.items()}


def _state(opt) -> dict:
    """Every tensor of every kind an Adam optimizer with amsgrad and EMA keeps, by kind then name."""
    return {"weights": opt.pull(), "ema": opt.pull(ema=True), "m": opt.pull_slot("m"), "v": opt.pull_slot("v"),
            "vhat": opt.pull_slot("vhat")}


def test_the_engine_leaves_a_tensor_without_gradient_exactly_as_it_was() -> None:
    config = parse_config(CONFIG)
    state = pipeline.init(INIT, config)
    step = pipeline.make_step(config, list(INIT))
    state = step(state, _engine(grads(1)))
    before = pipeline.export(state)
    sub_config = parse_config(CONFIG)
    sub = pipeline.restore(1, {slot: {k: v for k, v in tensors.items() if k != "b"} for slot, tensors in before.items()})
    g = {k: v for k, v in _engine(grads(2)).items() if k != "b"}
    state = step(state, g)
    sub = pipeline.make_step(sub_config, ["w", "emb"])(sub, g)
    after, want = pipeline.export(state), pipeline.export(sub)
    assert int(state.iterations) == 2  # the call counts, as tf-keras's iterations.assign_add(1) does
    for slot in after:
        np.testing.assert_array_equal(after[slot]["b"], before[slot]["b"], err_msg=f"{slot}/b moved")
        for name in ("w", "emb"):  # global_clipnorm spans the present gradients only, as in tf-keras
            np.testing.assert_array_equal(after[slot][name], want[slot][name], err_msg=f"{slot}/{name}")


def test_by_default_a_push_that_misses_a_tensor_is_refused_and_changes_nothing(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, INIT, CONFIG)
    opt.push(grads(1))
    before = snapshot(opt)
    partial = {k: v for k, v in grads(2).items() if k != "b"}
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "gradients: missing ['b']", opt.push, partial)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "missing SKIP", opt.push, partial, missing="refuse")
    assert_same_state(before, snapshot(opt))
    with pytest.raises(InvalidArgumentError, match="missing: must be one of"):
        opt.push(partial, missing="ignore")


SLOT_KINDS = [("params", "weights"), ("m", "m"), ("v", "v"), ("vhat", "vhat"), ("ema", "ema")]


def test_skip_steps_the_present_tensors_and_leaves_the_others(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, INIT, CONFIG)
    opt.push(grads(1))
    before = _state(opt)
    partial = {k: v for k, v in grads(2).items() if k != "b"}
    result = opt.push(partial, missing="skip")
    assert int(result) == 2 and result.iterations == 2
    after = _state(opt)
    for kind in after:
        np.testing.assert_array_equal(after[kind]["b"], before[kind]["b"], err_msg=f"{kind}/b moved")
    # the oracle: an optimizer of the present tensors alone, from the same state and iterations
    sub = pipeline.restore(1, {slot: {n: before[kind][n] for n in ("w", "emb")} for slot, kind in SLOT_KINDS})
    sub = pipeline.make_step(parse_config(CONFIG), ["w", "emb"])(sub, _engine(partial))
    for slot, kind in SLOT_KINDS:
        for n in ("w", "emb"):
            np.testing.assert_allclose(after[kind][n], np.asarray(getattr(sub, slot)[n]), rtol=1e-6, atol=1e-7,
                                       err_msg=f"{kind}/{n}")
            assert not np.array_equal(after[kind][n], before[kind][n]), f"{kind}/{n} did not move"
    assert opt.info().iterations == 2


def test_skip_with_no_gradient_at_all_is_refused(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, INIT, CONFIG)
    before = snapshot(opt)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "gradients: empty push", opt.push, {}, missing="skip")
    assert_same_state(before, snapshot(opt))


def test_an_unknown_missing_value_on_the_wire_is_refused(server, client: Client, name: str) -> None:
    opt = client.create_optimizer(name, INIT, CONFIG)
    before = snapshot(opt)
    w = np.ones((3, 4), np.float32)
    header = pb.PushHeader(optimizer=name, missing=7,
                           gradients=[pb.GradientSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=[3, 4])])
    with grpc.insecure_channel(server.address) as channel:
        push = channel.stream_unary("/optserve.v1.OptimizerService/PushGradients", request_serializer=None,
                                    response_deserializer=pb.PushGradientsResponse.FromString)
        with pytest.raises(grpc.RpcError) as caught:
            push(encode_stream(header, [w]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("missing: unknown value 7"), caught.value.details()
    assert_same_state(before, snapshot(opt))


@pytest.mark.parametrize("transport", ["local", "grpc", "network"])
def test_skip_goes_through_every_data_path(server, name: str, transport: str) -> None:
    with Client(server.address, timeout=60, transport=transport) as client:
        opt = client.create_optimizer(name, INIT, CONFIG)
        before = _state(opt)
        opt.push({"w": grads(3)["w"]}, missing="skip")
        after = _state(opt)
        for kind in after:
            np.testing.assert_array_equal(after[kind]["b"], before[kind]["b"], err_msg=f"{kind}/b")
            np.testing.assert_array_equal(after[kind]["emb"], before[kind]["emb"], err_msg=f"{kind}/emb")
        assert not np.array_equal(after["weights"]["w"], before["weights"]["w"])


def test_a_retried_partial_push_is_answered_not_applied_again(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, INIT, CONFIG)
    partial = {"w": grads(4)["w"]}
    first = opt.push(partial, worker_id="a", seq=0, missing="skip")
    state = snapshot(opt)
    again = opt.push(partial, worker_id="a", seq=0, missing="skip")
    assert again.duplicate and int(again) == int(first)
    assert_same_state(state, snapshot(opt))


def test_sync_round_counts_a_missing_tensor_as_zero_and_skips_one_missing_everywhere(client: Client,
                                                                                       name: str) -> None:
    opt = client.create_optimizer(name, INIT, CONFIG, mode="sync", num_workers=2)
    ref = client.create_optimizer(name + "-ref", INIT, CONFIG)
    try:
        g1, g2 = grads(5), grads(6)
        first = {"w": g1["w"], "emb": g1["emb"]}  # b: missing from every gradient of the round
        second = {"w": g2["w"]}  # emb: missing from this one, so zero in the mean
        before = _state(opt)
        errors = []

        def push(worker: str, g: dict) -> None:
            try:
                opt.push(g, worker_id=worker, base_version=0, missing="skip")
            except Exception as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=push, args=("a", first)), threading.Thread(target=push, args=("b", second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        mean = {"w": (g1["w"] + g2["w"]) / np.float32(2),
                "emb": IndexedSlices(g1["emb"].indices, g1["emb"].values / np.float32(2))}
        ref.push(mean, missing="skip")
        got, want = _state(opt), _state(ref)
        for kind in got:
            np.testing.assert_array_equal(got[kind]["b"], before[kind]["b"], err_msg=f"{kind}/b moved")
            for n in ("w", "emb"):
                np.testing.assert_array_equal(got[kind][n], want[kind][n], err_msg=f"{kind}/{n}")
        assert opt.info().iterations == 1
    finally:
        client.delete_optimizer(ref.name)


def test_partial_pushes_survive_a_sigkill_bit_for_bit(tmp_path: Path) -> None:
    port, log = free_port(), io.StringIO()
    args = ["--port", str(port), "--data-dir", str(tmp_path / "data")]
    process = ServerProcess(args, log=log)
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            opt = client.create_optimizer("p", INIT, CONFIG)
            opt.push(grads(1))
            opt.push({"w": grads(2)["w"]}, missing="skip")
            opt.push({"emb": grads(3)["emb"], "b": grads(3)["b"]}, missing="skip")
            want = snapshot(opt)
        process.process.send_signal(signal.SIGKILL)
        process.process.wait(timeout=30)
        process = ServerProcess(args, log=log)
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            assert_same_state(want, snapshot(client.optimizer("p")))
    finally:
        process.stop()
