"""One logical optimizer over three real server processes: Keras's numbers, checkpoints, SIGKILL of a shard."""

import io
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from optserve.client import Client, IndexedSlices, OptserveError
from optserve.server.launch import ServerProcess
from tests.conformance_cases import assert_slots_and_final, case_names, load_case, replay_steps
from tests.test_durability import free_port

SHARDS = 3
MAX_SHARD_BYTES = 16  # every tensor of the cases with more than 4 elements is split over the shards


@pytest.fixture(scope="module")
def shard_processes(tmp_path_factory) -> Iterator[list[ServerProcess]]:
    """Three `optserve serve` processes, each with its own data dir."""
    processes = []
    try:
        for index in range(SHARDS):
            data_dir = tmp_path_factory.mktemp(f"shard{index}")
            processes.append(ServerProcess(["--data-dir", str(data_dir)], log=io.StringIO()))
        yield processes
    finally:
        for process in processes:
            process.stop()


@pytest.fixture(scope="module")
def sharded(shard_processes) -> Iterator[Client]:
    with Client([p.address for p in shard_processes], timeout=60.0) as client:
        yield client


@pytest.mark.parametrize("case_name", case_names())
def test_case_matches_tf_keras_over_three_shards(sharded, case_name: str) -> None:
    case = load_case(case_name)
    opt = sharded.create_optimizer(f"sharded-{case_name}", case.init, case.config, max_shard_bytes=MAX_SHARD_BYTES)
    try:
        split = [name for name in case.init if len(opt.placement.of_tensor(name)) > 1]
        assert split, "the case must exercise split tensors"

        def push(k: int, grads: dict) -> int:
            version = opt.push(grads, worker_id="w", seq=k)
            assert version.versions == (k + 1,) * SHARDS
            return version

        replay_steps(opt, case, push)
        assert opt.save() == case.steps
        assert_slots_and_final(opt, case)
    finally:
        sharded.delete_optimizer(opt.name)


# --- a shard killed and restarted in the middle of a run ------------------------------------------

INIT = {"emb": np.linspace(-1, 1, 600, dtype=np.float32).reshape(200, 3), "w": np.ones((40, 5), np.float32),
        "b": np.zeros(5, np.float32)}
CONFIG = {"learning_rate": 0.01, "amsgrad": True, "use_ema": True, "global_clipnorm": 1.0, "weight_decay": 0.01,
          "exclude_from_weight_decay": ["b$"]}
STEPS = 40


def grads_for(seq: int) -> dict:
    rng = np.random.default_rng(seq)
    return {"emb": IndexedSlices(rng.integers(0, 200, 7), rng.normal(size=(7, 3)).astype(np.float32)),
            "w": rng.normal(size=(40, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}


class Shard:
    """A shard process on a fixed port and data dir, so it can be killed and started again as the same shard."""

    def __init__(self, data_dir):
        self.port, self.data_dir = free_port(), data_dir
        self.process = self.start()

    def start(self) -> ServerProcess:
        return ServerProcess(["--port", str(self.port), "--data-dir", str(self.data_dir), "--bulk-port", "-1"],
                             log=io.StringIO())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def state_of(opt) -> dict[str, np.ndarray]:
    pulled = {"weights": opt.pull(), "ema": opt.pull(ema=True), "m": opt.pull_slot("m"), "v": opt.pull_slot("v"),
              "vhat": opt.pull_slot("vhat")}
    return {f"{kind}/{name}": array.copy() for kind, tensors in pulled.items() for name, array in tensors.items()}


@pytest.fixture
def three_shards(tmp_path) -> Iterator[list[Shard]]:
    shards = []
    try:
        for index in range(SHARDS):
            shards.append(Shard(tmp_path / f"shard{index}"))
        yield shards
    finally:
        for shard in shards:
            shard.process.stop()


@pytest.mark.parametrize("mode", ["async", "sync"])  # sync: one worker, each round two-phase (global_clipnorm)
def test_a_shard_killed_mid_run_and_restarted_ends_bit_for_bit_as_an_uninterrupted_run(three_shards, mode) -> None:
    addresses = [shard.address for shard in three_shards]
    with Client(addresses, timeout=120.0) as client:
        calm = client.create_optimizer("calm", INIT, CONFIG, max_shard_bytes=256, mode=mode)
        for seq in range(STEPS):
            calm.push(grads_for(seq), worker_id="worker", seq=seq, base_version=seq)
        expected = state_of(calm)

        opt = client.create_optimizer("killed", INIT, CONFIG, max_shard_bytes=256, mode=mode)
        assert len(opt.placement.of_tensor("emb")) > 1
        victim = three_shards[1]
        progress = threading.Event()

        def kill_and_restart() -> None:
            progress.wait(timeout=120)
            victim.process.process.send_signal(signal.SIGKILL)  # mid-push, most likely: the worker never pauses
            victim.process.process.wait(timeout=30)
            time.sleep(0.5)
            victim.process = victim.start()

        killer = threading.Thread(target=kill_and_restart)
        killer.start()
        duplicates = 0
        for seq in range(STEPS):
            if seq == STEPS // 3:
                progress.set()
            # the client retries across the restart
            result = opt.push(grads_for(seq), worker_id="worker", seq=seq, base_version=seq)
            assert int(result) == seq + 1
            duplicates += result.duplicate
        killer.join(timeout=180)
        assert not killer.is_alive()
        assert victim.process.process.pid is not None and any("restored optimizer 'killed'" in line
                                                              for line in victim.process.lines)
        got = state_of(opt)
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
        assert opt.info().version == STEPS


def test_a_shard_that_stays_down_gives_unavailable_naming_it_and_the_retry_completes_the_push(three_shards) -> None:
    addresses = [shard.address for shard in three_shards]
    with Client(addresses, timeout=60.0) as client:
        opt = client.create_optimizer("down", INIT, CONFIG, max_shard_bytes=256)
        opt.push(grads_for(0), worker_id="worker", seq=0)
    with Client(addresses, timeout=3.0) as client:
        opt = client.optimizer("down")
        three_shards[2].process.process.send_signal(signal.SIGKILL)
        three_shards[2].process.process.wait(timeout=30)
        with pytest.raises(OptserveError) as caught:
            opt.push(grads_for(1), worker_id="worker", seq=1)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        message = caught.value.details()
        assert addresses[2] in message and "applied by shards [0, 1]" in message, message
        assert "same push" in message and "seq 1" in message, message
    three_shards[2].process = three_shards[2].start()
    with Client(addresses, timeout=60.0) as client:
        opt = client.optimizer("down")
        assert [shard.version for shard in opt.info().shards] == [2, 2, 1]  # part-stepped, as the error said
        again = opt.push(grads_for(1), worker_id="worker", seq=1)
        assert again.versions == (2, 2, 2) and not again.duplicate
        assert opt.info().version == 2
        assert opt.pull().versions == (2, 2, 2)
