"""Durability over real server processes: SIGKILL, SIGTERM, torn logs, corrupt checkpoints, full disks."""

import io
import resource
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.client import Client, IndexedSlices, OptserveError
from optserve.server.engine import parse_config, pipeline
from optserve.server.launch import ServerProcess
from optserve.server.options import ServerOptions
from optserve.v1 import optserve_pb2 as pb
from optserve.v1 import optserve_pb2_grpc as pb_grpc
from tests.conftest import RunningServer
from tests.test_bad_input import assert_same_state, expect_error, snapshot, snapshot_weights

CONFIG = {"learning_rate": 0.01, "amsgrad": True, "use_ema": True, "ema_momentum": 0.9, "weight_decay": 0.01}
INIT = {"w": np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6), "emb": np.ones((8, 3), np.float32)}


def grads_for(worker: str, seq: int) -> dict:
    rng = np.random.default_rng([hash(worker) % 1000, seq])
    return {"w": rng.normal(size=(4, 6)).astype(np.float32),
            "emb": IndexedSlices(rng.integers(0, 8, 3), rng.normal(size=(3, 3)).astype(np.float32))}


def reference(ordered: list[tuple[str, int]]) -> pipeline.OptimizerState:
    """The engine alone, applying the same gradients in the same order: the uninterrupted run."""
    config = parse_config(CONFIG)
    state, step = pipeline.init(INIT, config), pipeline.make_step(config, list(INIT))
    for worker, seq in ordered:
        g = grads_for(worker, seq)
        state = step(state, {"w": g["w"], "emb": pipeline.sparse_grad(g["emb"].indices, g["emb"].values)})
    return state


def assert_state_equals(opt, state: pipeline.OptimizerState) -> None:
    """Weights, EMA and every Adam slot equal, bit for bit."""
    pulled = {"params": opt.pull(), "ema": opt.pull(ema=True), "m": opt.pull_slot("m"), "v": opt.pull_slot("v"),
              "vhat": opt.pull_slot("vhat")}
    for slot, tensors in pulled.items():
        for name, value in tensors.items():
            np.testing.assert_array_equal(value, np.asarray(getattr(state, slot)[name]), err_msg=f"{slot}/{name}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`optserve serve` on a fixed port and data dir, restartable."""

    def __init__(self, data_dir: Path, *args: str):
        self.port = free_port()
        self.args = ["--data-dir", str(data_dir), *args]
        self.log = io.StringIO()
        self.process: ServerProcess | None = None

    def start(self) -> "Server":
        self.process = ServerProcess(["--port", str(self.port), *self.args], log=self.log)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.process.process.send_signal(signal.SIGKILL)
        self.process.process.wait(timeout=30)

    def text(self) -> str:
        return "".join(self.process.lines) + self.log.getvalue()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.mark.parametrize("kill_after", [3, 17, 40])
def test_sigkill_mid_stream_then_restart_equals_the_uninterrupted_run(data_dir: Path, kill_after: int) -> None:
    server = Server(data_dir, "--checkpoint-every", "7").start()
    try:
        with Client(server.address, timeout=60) as client:
            client.create_optimizer("m", INIT, CONFIG)
        workers, pushes = ["w0", "w1", "w2"], 20
        versions: dict[tuple[str, int], int] = {}
        errors = []

        def work(worker: str) -> None:
            try:
                with Client(server.address, timeout=90) as own:  # retries across the restart by itself
                    opt = own.optimizer("m")
                    for seq in range(pushes):
                        versions[(worker, seq)] = int(opt.push(grads_for(worker, seq), worker_id=worker, seq=seq))
            except Exception as err:
                errors.append(err)

        pulled_versions: list[int] = []
        pushing = threading.Event()
        pushing.set()

        def pull() -> None:  # pulls go on across the restart too
            try:
                with Client(server.address, timeout=90) as own:
                    opt = own.optimizer("m")
                    for _ in range(10_000):
                        if not pushing.is_set():
                            break
                        pulled_versions.append(opt.pull(names=["w"]).version)
            except Exception as err:
                errors.append(err)

        threads = [threading.Thread(target=work, args=(w,)) for w in workers]
        puller = threading.Thread(target=pull)
        for thread in threads + [puller]:
            thread.start()
        deadline = time.monotonic() + 120
        while len(versions) < kill_after and time.monotonic() < deadline:
            time.sleep(0.001)
        server.kill()
        server.start()
        for thread in threads:
            thread.join(timeout=180)
        pushing.clear()
        puller.join(timeout=120)
        assert not errors, errors
        assert pulled_versions == sorted(pulled_versions), "a pull went back in time across the restart"
        order = sorted(versions, key=versions.get)
        assert [versions[k] for k in order] == list(range(1, len(workers) * pushes + 1))  # none lost, none twice
        with Client(server.address, timeout=60) as client:
            opt = client.optimizer("m")
            assert opt.info().iterations == len(workers) * pushes
            assert_state_equals(opt, reference(order))
        assert "restored optimizer 'm'" in server.text()
    finally:
        server.process.stop()


def test_sigterm_saves_everything_and_a_restart_restores_it(data_dir: Path) -> None:
    server = Server(data_dir).start()
    with Client(server.address, timeout=60) as client:
        opt = client.create_optimizer("m", INIT, CONFIG)
        for seq in range(5):
            opt.push(grads_for("a", seq), worker_id="a", seq=seq)
        before = snapshot(opt)
    assert server.process.stop() == 0
    manifest = (data_dir / "m" / "manifest.json").read_text()
    assert '"version": 5' in manifest
    assert all(path.stat().st_size == 0 for path in (data_dir / "m").glob("wal-000000000005.log"))
    server.start()
    try:
        with Client(server.address, timeout=60) as client:
            opt = client.optimizer("m")
            assert_same_state(before, snapshot(opt))
            again = opt.push(grads_for("a", 4), worker_id="a", seq=4)  # the exactly-once table came back too
            assert again == 5 and again.duplicate
            assert opt.info().saved_version == 5
    finally:
        server.process.stop()


def test_an_optimizer_without_amsgrad_or_ema_restores_too(data_dir: Path) -> None:
    server = Server(data_dir).start()
    with Client(server.address, timeout=60) as client:
        opt = client.create_optimizer("plain", {"w": np.ones(3, np.float32)}, {"learning_rate": 0.1})
        opt.push({"w": np.ones(3, np.float32)})
        opt.save()
        opt.push({"w": np.ones(3, np.float32)})
        before = opt.pull()["w"].copy()
    server.kill()
    server.start()
    try:
        with Client(server.address, timeout=60) as client:
            np.testing.assert_array_equal(client.optimizer("plain").pull()["w"], before)
    finally:
        server.process.stop()


def test_retry_after_a_crash_is_answered_not_applied_again(data_dir: Path) -> None:
    server = Server(data_dir).start()
    with Client(server.address, timeout=60) as client:
        opt = client.create_optimizer("m", INIT, CONFIG)
        opt.push(grads_for("a", 0), worker_id="a", seq=0)
        opt.push(grads_for("a", 1), worker_id="a", seq=1)
    server.kill()  # no checkpoint since create: both pushes live only in the log
    server.start()
    try:
        with Client(server.address, timeout=60) as client:
            opt = client.optimizer("m")
            again = opt.push(grads_for("a", 1), worker_id="a", seq=1)
            assert again == 2 and again.duplicate and opt.info().iterations == 2
            assert_state_equals(opt, reference([("a", 0), ("a", 1)]))
    finally:
        server.process.stop()


def test_sync_rounds_summed_on_the_device_survive_a_crash_bit_for_bit(data_dir: Path) -> None:
    """Each round's on-device mean is logged before its step; after SIGKILL the log replays it exactly."""
    workers, rounds = ["a", "b", "c"], 3
    server = Server(data_dir).start()
    with Client(server.address, timeout=60) as client:
        client.create_optimizer("sync", INIT, CONFIG, mode="sync", num_workers=len(workers))

    def work(worker: str) -> None:
        with Client(server.address, timeout=60) as own:
            opt = own.optimizer("sync")
            for seq in range(rounds):
                assert opt.push(grads_for(worker, seq), worker_id=worker, seq=seq, base_version=seq) == seq + 1

    with ThreadPoolExecutor(max_workers=len(workers)) as pool:
        for future in [pool.submit(work, w) for w in workers]:
            future.result(timeout=120)
    server.kill()  # no checkpoint since create: every round lives only in the log
    config = parse_config(CONFIG)
    state, step = pipeline.init(INIT, config), pipeline.make_step(config, list(INIT))
    for seq in range(rounds):  # the documented aggregate: summed in worker-id order, then divided
        grads = [grads_for(w, seq) for w in sorted(workers)]
        dense = (grads[0]["w"] + grads[1]["w"] + grads[2]["w"]) / np.float32(3)
        indices = np.concatenate([g["emb"].indices for g in grads])
        rows = np.concatenate([g["emb"].values for g in grads]) / np.float32(3)
        state = step(state, {"w": dense, "emb": pipeline.sparse_grad(indices, rows)})
    server.start()
    try:
        with Client(server.address, timeout=60) as client:
            opt = client.optimizer("sync")
            assert opt.info().iterations == rounds
            assert_state_equals(opt, state)
    finally:
        server.process.stop()


@pytest.mark.parametrize("damage", ["torn", "garbage"])
def test_a_torn_or_corrupt_log_tail_is_cut_at_the_last_whole_record(data_dir: Path, damage: str) -> None:
    server = Server(data_dir).start()
    with Client(server.address, timeout=60) as client:
        opt = client.create_optimizer("m", INIT, CONFIG)
        for seq in range(4):
            opt.push(grads_for("a", seq), worker_id="a", seq=seq)
    server.kill()
    (log_file,) = (data_dir / "m").glob("wal-*.log")
    data = log_file.read_bytes()
    if damage == "torn":  # the last record half written, as a crash mid-write leaves it
        log_file.write_bytes(data[: len(data) - 100])
        expected = [("a", s) for s in range(3)]
    else:  # bytes that are no record at all after the last one
        log_file.write_bytes(data + b"\x00garbage" * 9)
        expected = [("a", s) for s in range(4)]
    server.start()
    try:
        with Client(server.address, timeout=60) as client:
            opt = client.optimizer("m")
            assert opt.info().version == len(expected)
            assert_state_equals(opt, reference(expected))
            opt.push(grads_for("a", 9), worker_id="a", seq=9)  # the cut log takes new records
        assert "torn or corrupt log" in server.text()
    finally:
        server.process.stop()


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one_and_loses_nothing(data_dir: Path) -> None:
    server = Server(data_dir).start()
    pushed = [("a", s) for s in range(8)]
    with Client(server.address, timeout=60) as client:
        opt = client.create_optimizer("m", INIT, CONFIG)
        for i, (worker, seq) in enumerate(pushed):
            opt.push(grads_for(worker, seq), worker_id=worker, seq=seq)
            if i in (2, 5):
                opt.save()
    server.kill()
    newest = data_dir / "m" / "ckpt-000000000006.npz"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    server.start()
    try:
        with Client(server.address, timeout=60) as client:
            opt = client.optimizer("m")
            assert opt.info().version == 8
            assert_state_equals(opt, reference(pushed))
        assert f"checkpoint {newest}: corrupt" in server.text()
        assert "from the previous checkpoint ckpt-000000000003.npz" in server.text()
    finally:
        server.process.stop()


def test_a_corrupt_checkpoint_without_a_fallback_stops_the_server_naming_the_file(data_dir: Path) -> None:
    server = Server(data_dir).start()
    with Client(server.address, timeout=60) as client:
        client.create_optimizer("m", INIT, CONFIG)
    server.kill()
    (only,) = (data_dir / "m").glob("ckpt-*.npz")
    only.write_bytes(only.read_bytes()[:-10])
    server.start()
    assert server.process.process.wait(timeout=60) == 1
    assert f"checkpoint {only}: corrupt" in server.text()
    assert "not serving" in server.text()


def test_durability_none_keeps_only_what_was_checkpointed(data_dir: Path) -> None:
    server = Server(data_dir, "--durability", "none").start()
    with Client(server.address, timeout=60) as client:
        opt = client.create_optimizer("m", INIT, CONFIG)
        for seq in range(5):
            opt.push(grads_for("a", seq))
            if seq == 2:
                assert opt.save() == 3
    server.kill()
    assert not list((data_dir / "m").glob("wal-*"))
    server.start()
    try:
        with Client(server.address, timeout=60) as client:
            opt = client.optimizer("m")
            assert opt.info().version == 3  # the two pushes after the checkpoint are gone, as documented
            assert_state_equals(opt, reference([("a", s) for s in range(3)]))
    finally:
        server.process.stop()


def test_a_full_disk_refuses_the_push_and_leaves_the_state_unchanged(data_dir: Path) -> None:
    params = {"w": np.zeros((64, 64), np.float32)}  # 16 KiB; a log record is a little more
    server = Server(data_dir).start()
    try:
        limit = 200 * 1024  # bytes any one file of the server may reach: "the disk is full" for the log
        resource.prlimit(server.process.process.pid, resource.RLIMIT_FSIZE, (limit, limit))
        with Client(server.address, timeout=60) as client:
            opt = client.create_optimizer("m", params, {"learning_rate": 0.1})
            g = {"w": np.ones((64, 64), np.float32)}
            with pytest.raises(OptserveError) as caught:
                for _ in range(limit // (16 * 1024) + 2):
                    opt.push(g)
                    before = snapshot_weights(opt)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "no space to log the change" in caught.value.details()
            assert_same_state(before, snapshot_weights(opt))
            version = opt.save()  # a checkpoint empties the log; pushes go on
            assert opt.push(g) == version + 1
    finally:
        server.process.stop()


def test_while_restoring_health_says_not_serving_and_calls_are_unavailable(data_dir: Path) -> None:
    first = RunningServer(ServerOptions(host="127.0.0.1", port=0, data_dir=str(data_dir)))
    with Client(first.address, timeout=30) as client:
        client.create_optimizer("m", INIT, CONFIG).push(grads_for("a", 0))
    first.stop()
    restoring = RunningServer(ServerOptions(host="127.0.0.1", port=0, data_dir=str(data_dir)), restore=False)
    try:
        channel = grpc.insecure_channel(restoring.address)
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="optserve.v1.OptimizerService"), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.OptimizerServiceStub(channel).ListOptimizers(pb.ListOptimizersRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "restoring" in caught.value.details()
        connected = []
        waiter = threading.Thread(target=lambda: connected.append(Client(restoring.address, timeout=30)))
        waiter.start()
        time.sleep(0.3)
        assert not connected  # the client waits for SERVING
        restoring.built.open()
        waiter.join(timeout=30)
        assert connected and connected[0].optimizer("m").info().version == 1
        status = health.Check(health_pb2.HealthCheckRequest(service="optserve.v1.OptimizerService"), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        connected[0].close()
        channel.close()
    finally:
        restoring.stop()


def test_too_many_optimizers_is_resource_exhausted() -> None:
    server = RunningServer(ServerOptions(host="127.0.0.1", port=0, max_optimizers=2))
    try:
        with Client(server.address, timeout=30) as client:
            client.create_optimizer("a", {"w": np.zeros(1, np.float32)})
            client.create_optimizer("b", {"w": np.zeros(1, np.float32)})
            expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "limit of 2 optimizers", client.create_optimizer, "c",
                         {"w": np.zeros(1, np.float32)})
            client.delete_optimizer("a")
            client.create_optimizer("c", {"w": np.zeros(1, np.float32)})
    finally:
        server.stop()


def test_save_without_a_data_dir_is_a_failed_precondition(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, {"w": np.zeros(1, np.float32)})
    expect_error(grpc.StatusCode.FAILED_PRECONDITION, "--data-dir", opt.save)
    client.delete_optimizer(name)


def test_more_concurrent_calls_than_the_limit_get_resource_exhausted() -> None:
    server = RunningServer(ServerOptions(host="127.0.0.1", port=0, max_concurrent_rpcs=2))
    try:
        with Client(server.address, timeout=30) as client:
            opt = client.create_optimizer("m", {"w": np.zeros(1, np.float32)})
            def hold_a_slot() -> None:  # a pull that waits 6 s on the server (retried while slots are full)
                for _ in range(100):
                    try:
                        opt.pull(min_version=5, timeout=6)
                    except OptserveError as err:
                        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                            return
                        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                        time.sleep(0.05)

            waiting = [threading.Thread(target=hold_a_slot) for _ in range(2)]
            for thread in waiting:
                thread.start()
            stub = pb_grpc.OptimizerServiceStub(client._channel)
            codes = []
            for _ in range(50):  # until both pulls wait on the server, holding the two slots
                try:
                    stub.GetOptimizer(pb.GetOptimizerRequest(name="m"), timeout=10)
                except grpc.RpcError as err:
                    codes.append(err.code())
                    break
                time.sleep(0.1)
            assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED]
            for thread in waiting:
                thread.join(timeout=30)
            deadline = time.monotonic() + 10  # the server frees a slot as its wait ends, just after the client's
            while time.monotonic() < deadline:
                try:
                    assert opt.info().version == 0
                    break
                except OptserveError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    time.sleep(0.1)
            else:
                raise AssertionError("the slots were never freed")
    finally:
        server.stop()


def test_log_records_are_written_without_copies_and_read_back_exactly(tmp_path: Path) -> None:
    """Records go out as views of the arrays in writev calls (more parts than one call takes), CRC'd part by part."""
    import jax.numpy as jnp
    import ml_dtypes

    from optserve.server.storage import LogRecord, OptimizerStore, _scan_log_file

    rng = np.random.default_rng(0)
    grads = {f"emb{k}": (rng.integers(0, 9, 3), rng.normal(size=(3, 2)).astype(np.float32)) for k in range(700)}
    grads["transposed"] = rng.normal(size=(4, 5)).astype(np.float32).T  # not contiguous
    grads["bf16"] = rng.normal(size=6).astype(ml_dtypes.bfloat16)
    grads["empty"] = np.zeros((0, 3), np.float32)
    grads["scalar"] = np.float32(1.5)  # shape (), not (1,)
    grads["device"] = jnp.arange(5, dtype=jnp.float32)  # a sync round's on-device sum
    store = OptimizerStore(tmp_path / "opt", "wal")
    (tmp_path / "opt").mkdir()
    store.start_log(0)
    records = [LogRecord("step", 1, [("w", 1)], grads), LogRecord("finalize", 2)]
    for record in records:
        store.append(record)
    store.close()
    read = [record for _, record in _scan_log_file(tmp_path / "opt" / "wal-000000000000.log").records]
    assert [(r.kind, r.version, r.workers) for r in read] == [("step", 1, [("w", 1)]), ("finalize", 2, [])]
    assert read[0].grads.keys() == grads.keys()
    for name, grad in grads.items():
        for got, want in zip(*(g if isinstance(g, tuple) else (g,) for g in (read[0].grads[name], grad))):
            assert got.dtype == np.asarray(want).dtype and got.shape == np.shape(want), name
            np.testing.assert_array_equal(got, np.asarray(want), err_msg=name)
