"""`optserve serve --devices N`: the state sharded over a server's local devices, with Keras's numbers.

The multi-device servers are real `optserve serve` processes whose JAX sees 4
CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=4`, which must
be set before JAX starts, so never in this process). The layout rules are
checked here directly.
"""

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import jax
import numpy as np
import pytest

from optserve.client import Client, IndexedSlices, OptserveError
from optserve.server.engine import devices
from optserve.server.launch import ServerProcess
from optserve.v1 import optserve_pb2 as pb
from optserve.v1 import optserve_pb2_grpc as pb_grpc
from optserve.wire.layout import FlatLayout
from tests.conformance_cases import assert_slots_and_final, case_names, load_case, replay_steps

DEVICES = 4
BLOCK = devices.BLOCK


# --- the layout ---------------------------------------------------------------


def _spans(sizes: list[int], count: int) -> tuple[list[tuple[int, int]], int]:
    offsets, size = devices.spread_offsets(sizes, count)
    return [(offset, offset + n) for offset, n in zip(offsets, sizes)], size


@pytest.mark.parametrize("sizes", [
    [4_000_000, 10, 1000, 3, 64, 1, 250_000],  # one large tensor, small ones
    [1000] * 37 + [7] * 11,  # many equal small ones
    [5, 3],  # fewer blocks than devices
    [2_359_296] * 3 + [512] * 40 + [30_522 * 768],  # BERT-like: an embedding, dense layers, biases
    [0, 17, 0, 0, 100_000, 0],  # empty tensors anywhere
])
def test_small_tensors_stay_whole_on_one_shard_and_large_ones_are_split(sizes: list[int]) -> None:
    spans, size = _spans(sizes, DEVICES)
    shard = size // DEVICES
    assert size % (DEVICES * BLOCK) == 0 and shard > 0
    for (start, stop), n in zip(spans, sizes):
        assert start % BLOCK == 0 and stop <= size
        if 0 < n <= shard * devices.SPLIT_FRACTION:
            assert start // shard == (stop - 1) // shard, f"a tensor of {n} elements straddles shard {start // shard}"
    ends = [stop for _, stop in spans]
    assert all(a <= b for a, b in zip(ends, [start for start, _ in spans][1:]))  # in order, no overlap
    packed = sum(-(-n // BLOCK) * BLOCK for n in sizes)
    assert size - packed < max(DEVICES * BLOCK, packed * devices.SPLIT_FRACTION + DEVICES * BLOCK)  # padding bounded


def test_a_tensor_larger_than_a_shard_is_spread_over_several_devices() -> None:
    (big, *_), size = _spans([1_000_000, 64, 64], DEVICES)
    shard = size // DEVICES
    assert {offset // shard for offset in range(big[0], big[1], BLOCK)} == set(range(DEVICES))


def test_a_flat_layout_refuses_overlapping_or_unaligned_offsets() -> None:
    with pytest.raises(ValueError, match=r"offsets\['b'\]"):
        FlatLayout({"a": (20,), "b": (3,)}, offsets=[0, 16])
    with pytest.raises(ValueError, match=r"offsets\['b'\]"):
        FlatLayout({"a": (3,), "b": (3,)}, offsets=[0, 17])
    with pytest.raises(ValueError, match="size"):
        FlatLayout({"a": (3,), "b": (3,)}, offsets=[0, 32], size=40)
    spread = FlatLayout({"a": (3,), "b": (3,)}, offsets=[0, 32], size=64)
    assert not spread.packed and FlatLayout({"a": (3,), "b": (3,)}).packed
    assert spread != FlatLayout({"a": (3,), "b": (3,)})


def test_devices_flag_values_the_local_devices_cannot_meet_are_refused_naming_the_flag() -> None:
    local = jax.local_devices()
    assert devices.placement("1") is None
    assert (devices.placement("all") is None) == (len(local) == 1)
    for bad in ("0", "-2", "two", str(len(local) + 1)):
        with pytest.raises(devices.DevicesConfigError, match="--devices"):
            devices.placement(bad)


# --- real servers over 4 CPU devices -------------------------------------------


@pytest.fixture(scope="module")
def four_devices() -> Iterator[None]:
    """Child processes see 4 CPU devices; this process keeps the JAX it already started."""
    before = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{before or ''} --xla_force_host_platform_device_count={DEVICES}".strip()
    yield
    if before is None:
        del os.environ["XLA_FLAGS"]
    else:
        os.environ["XLA_FLAGS"] = before


@pytest.fixture(scope="module")
def spread_server(four_devices: None) -> Iterator[ServerProcess]:
    with ServerProcess(["--devices", str(DEVICES)], log=open(os.devnull, "w")) as server:
        yield server


def _placement(address: str, name: str) -> pb.OptimizerInfo:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.OptimizerServiceStub(channel).GetOptimizer(pb.GetOptimizerRequest(name=name), timeout=30)


def _assert_spread(info: pb.OptimizerInfo, slots: set[str], count: int = DEVICES) -> None:
    """Every slot is cut into `count` contiguous shards on distinct devices; small tensors lie in one shard."""
    placement = info.placement
    assert {slot.slot for slot in placement.slots} == slots
    size = placement.flat_size
    for slot in placement.slots:
        spans = [(shard.start, shard.stop) for shard in slot.shards]
        assert len({shard.device for shard in slot.shards}) == count, f"{slot.slot}: {slot.shards}"
        assert spans == [(i * size // count, (i + 1) * size // count) for i in range(count)], slot.slot
    assert info.device == ",".join(f"cpu:{i}" for i in range(count))
    shard = size // count
    for spec, start in zip(info.tensors, placement.tensor_offsets, strict=True):
        count = int(np.prod(spec.shape, dtype=np.int64))
        if 0 < count <= shard * devices.SPLIT_FRACTION:
            assert start // shard == (start + count - 1) // shard, f"{spec.name} straddles two devices"


@pytest.mark.parametrize("case_name", case_names())
def test_every_conformance_case_matches_tf_keras_on_a_server_spread_over_four_devices(
        spread_server: ServerProcess, case_name: str) -> None:
    case = load_case(case_name)
    with Client(spread_server.address) as client:
        opt = client.create_optimizer(f"spread-{case_name}", case.init, case.config)
        try:
            amsgrad = opt.info().config["amsgrad"]
            slots = {"weights", "m", "v"} | ({"ema"} if case.has_ema else set()) | ({"vhat"} if amsgrad else set())
            _assert_spread(_placement(spread_server.address, opt.name), slots)  # as created
            replay_steps(opt, case, lambda k, grads: opt.push(grads))
            _assert_spread(_placement(spread_server.address, opt.name), slots)  # as the steps left it
            assert_slots_and_final(opt, case)
            _assert_spread(_placement(spread_server.address, opt.name), slots)  # after finalize
        finally:
            client.delete_optimizer(opt.name)


@pytest.mark.parametrize("case_name", ["rmsprop_centered_momentum", "ftrl_l1_l2", "nadam_betas_sched",
                                       "adafactor_defaults", "adagrad_sparse_dup"])
def test_family_cases_match_tf_keras_over_four_devices(spread_server: ServerProcess, case_name: str) -> None:
    """Other classes over the mesh: their slots spread as the weights are (Adafactor's factors stay whole)."""
    case = load_case(case_name)
    with Client(spread_server.address) as client:
        opt = client.create_optimizer(f"spread-{case_name}", case.init, case.config, optimizer=case.class_name)
        try:
            replay_steps(opt, case, lambda k, grads: opt.push(grads))
            shared = {"weights"} | ({"ema"} if case.has_ema else set()) | (set(case.slot_names) - {"r", "c"})
            info = _placement(spread_server.address, opt.name)
            kept = [slot for slot in info.placement.slots if slot.slot in shared]
            assert {slot.slot for slot in info.placement.slots} - shared <= {"r", "c"}
            del info.placement.slots[:]
            info.placement.slots.extend(kept)
            _assert_spread(info, shared)
            assert_slots_and_final(opt, case)
        finally:
            client.delete_optimizer(opt.name)


def _mixed_model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One embedding table much larger than a shard, and small dense layers and biases."""
    params = {"embedding": rng.normal(size=(4096, 64)).astype(np.float32)}
    for i in range(6):
        params[f"dense_{i}/kernel"] = rng.normal(size=(64, 32)).astype(np.float32)
        params[f"dense_{i}/bias"] = rng.normal(size=(32,)).astype(np.float32)
    return params


def _steps(rng: np.random.Generator, params: dict[str, np.ndarray], count: int) -> list[dict]:
    steps = []
    for _ in range(count):
        grads = {name: rng.normal(size=value.shape).astype(np.float32) for name, value in params.items()}
        rows = rng.integers(0, 4096, size=50)
        grads["embedding"] = IndexedSlices(indices=rows, values=rng.normal(size=(50, 64)).astype(np.float32))
        steps.append(grads)
    return steps


CONFIG = {"learning_rate": 0.01, "global_clipnorm": 1.0, "use_ema": True, "weight_decay": 0.004,
          "exclude_from_weight_decay": ["bias"]}


def _run(address: str, name: str, params: dict, steps: list[dict], mode: dict | None = None) -> dict:
    with Client(address) as client:
        opt = client.create_optimizer(name, params, CONFIG, **(mode or {}))
        for seq, grads in enumerate(steps):
            opt.push(grads, worker_id="w0", seq=seq, base_version=seq)
        return {kind: dict(opt.pull(ema=kind == "ema").items()) for kind in ("weights", "ema")}


def test_a_spread_server_computes_what_one_device_does_and_survives_sigkill_restored_over_other_devices(
        four_devices: None, server_one_device: ServerProcess, tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    params = _mixed_model(rng)
    steps = _steps(rng, params, 6)
    want = _run(server_one_device.address, "mixed", params, steps)
    data_dir = tmp_path / "data"
    with ServerProcess(["--devices", str(DEVICES), "--data-dir", str(data_dir)], log=open(os.devnull, "w")) as server:
        _run(server.address, "mixed", params, steps[:4])
        with Client(server.address) as client:
            opt = client.optimizer("mixed")
            for seq in (4, 5, 5):  # the last one a retry, applied once
                assert opt.push(steps[seq], worker_id="w0", seq=seq, base_version=seq) == seq + 1
        info = _placement(server.address, "mixed")
        server.process.kill()  # SIGKILL: the restart replays the logged steps onto the new layout
        server.process.wait(30)
    _assert_spread(info, {"weights", "m", "v", "ema"})
    embedding = list(info.tensors).index(next(t for t in info.tensors if t.name == "embedding"))
    start, shard = info.placement.tensor_offsets[embedding], info.placement.flat_size // DEVICES
    assert {offset // shard for offset in range(start, start + 4096 * 64, BLOCK)} == set(range(DEVICES))
    with ServerProcess(["--devices", "2", "--data-dir", str(data_dir)], log=open(os.devnull, "w")) as server:
        with Client(server.address) as client:
            opt = client.optimizer("mixed")
            got = {kind: dict(opt.pull(ema=kind == "ema").items()) for kind in ("weights", "ema")}
        _assert_spread(_placement(server.address, "mixed"), {"weights", "m", "v", "ema"}, count=2)
    for kind in ("weights", "ema"):
        for name, value in want[kind].items():
            np.testing.assert_allclose(got[kind][name], value, rtol=2e-6, atol=1e-7, err_msg=f"{kind} {name}")


def test_a_sync_round_on_a_spread_server_steps_once_on_the_mean(spread_server: ServerProcess,
                                                                  server_one_device: ServerProcess) -> None:
    rng = np.random.default_rng(3)
    params = _mixed_model(rng)
    grads = [{n: rng.normal(size=v.shape).astype(np.float32) for n, v in params.items()} for _ in range(2)]
    mean = {n: (grads[0][n] + grads[1][n]) / np.float32(2) for n in params}
    with Client(spread_server.address) as client:
        opt = client.create_optimizer("sync-round", params, CONFIG, mode="sync", num_workers=2)
        with ThreadPoolExecutor(2) as pool:
            versions = list(pool.map(lambda i: opt.push(grads[i], worker_id=f"w{i}", base_version=0), range(2)))
        assert versions == [1, 1]
        got = opt.pull()
        client.delete_optimizer("sync-round")
    with Client(server_one_device.address) as client:
        opt = client.create_optimizer("sync-reference", params, CONFIG)
        opt.push(mean)
        want = opt.pull()
        client.delete_optimizer("sync-reference")
    for name in params:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-6, atol=1e-7, err_msg=name)


def _every_slot(opt) -> dict[str, dict[str, np.ndarray]]:
    return {"weights": dict(opt.pull()), "ema": dict(opt.pull(ema=True)), "m": dict(opt.pull_slot("m")),
            "v": dict(opt.pull_slot("v"))}


@pytest.mark.parametrize("bad, code, fragment", [
    ({"dense_0/bias": np.zeros(31, np.float32)}, grpc.StatusCode.INVALID_ARGUMENT, "dense_0/bias"),
    ({"dense_1/kernel": np.full((64, 32), np.nan, np.float32)}, grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    ({"embedding": IndexedSlices(indices=np.array([4096]), values=np.ones((1, 64), np.float32))},
     grpc.StatusCode.INVALID_ARGUMENT, "embedding"),
])
def test_a_refused_push_leaves_every_slot_of_a_spread_state_as_it_was(spread_server: ServerProcess, bad: dict,
                                                                      code: grpc.StatusCode, fragment: str) -> None:
    rng = np.random.default_rng(5)
    params = _mixed_model(rng)
    with Client(spread_server.address) as client:
        opt = client.create_optimizer("refused", params, CONFIG)
        try:
            opt.push(_steps(rng, params, 1)[0])
            before = _every_slot(opt)
            grads = {**_steps(rng, params, 1)[0], **bad}
            with pytest.raises(OptserveError) as caught:
                opt.push(grads, worker_id="w", seq=1)
            assert caught.value.code() == code and fragment in caught.value.details(), caught.value.details()
            after = _every_slot(opt)
            for kind, tensors in before.items():
                for name, value in tensors.items():
                    assert np.array_equal(after[kind][name], value), f"{kind} {name} changed"
            assert opt.info().version == 1
        finally:
            client.delete_optimizer("refused")


def test_a_server_asked_for_more_devices_than_it_has_exits_naming_the_flag(four_devices: None) -> None:
    with pytest.raises(RuntimeError, match="--devices: 5 asked for, but JAX sees 4"):
        ServerProcess(["--devices", "5"], log=open(os.devnull, "w"), start_timeout=120)


@pytest.fixture(scope="module")
def server_one_device() -> Iterator[ServerProcess]:
    with ServerProcess([], log=open(os.devnull, "w")) as server:
        yield server


def test_assigned_state_values_land_on_a_spread_server_and_keep_the_spread(spread_server: ServerProcess) -> None:
    """A push's non-trainable values are written into the sharded weights and EMA in place; the slots stay spread."""
    rng = np.random.default_rng(5)
    params = {"kernel": rng.standard_normal((300, 500)).astype(np.float32), "bias": np.zeros(500, np.float32)}
    state = {"bn/mean": np.zeros(500, np.float32), "bn/var": np.ones(500, np.float32)}
    with Client(spread_server.address) as client:
        opt = client.create_optimizer("assigned", params, {"learning_rate": 0.01, "use_ema": True}, state=state)
        try:
            for step in range(3):
                grads = {name: rng.standard_normal(value.shape).astype(np.float32) for name, value in params.items()}
                new = {name: np.full(500, step + 1.5, np.float32) for name in state}
                opt.push(grads, state=new)
            for ema in (False, True):
                pulled = opt.pull(ema=ema)
                for name in state:
                    np.testing.assert_array_equal(pulled[name], np.full(500, 3.5, np.float32))
            _assert_spread(_placement(spread_server.address, "assigned"), {"weights", "m", "v", "ema"})
        finally:
            client.delete_optimizer("assigned")
