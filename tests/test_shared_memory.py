"""The same-host path: segments are private, bounded, reclaimed, never trusted, and give the stream's numbers."""

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optserve.client import Client, OptserveError
from optserve.client.shared_memory import NOT_SAME_HOST, ClientSegment
from optserve.server.launch import ServerProcess
from optserve.server.options import ServerOptions
from optserve.v1 import optserve_pb2 as pb
from optserve.v1 import optserve_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, wait_until

TOKEN = "shm-test-token"
OTHER_TOKEN = "shm-other-token"
PARAMS = {"w": np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6), "b": np.arange(5, dtype=np.float32)}
CONFIG = {"learning_rate": 0.01, "clipnorm": 0.5, "weight_decay": 0.01, "use_ema": True, "amsgrad": True}


def _shm_dir() -> str:
    """A private folder on the shm tmpfs, so a test sees only its own server's files."""
    return tempfile.mkdtemp(prefix="optserve-test-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)


@pytest.fixture(scope="module")
def shm_server() -> Iterator[RunningServer]:
    directory = _shm_dir()
    running = RunningServer(ServerOptions(host="127.0.0.1", port=0, shm_dir=directory, shm_idle_timeout=0.5,
                                          shm_max_segments=12, shm_max_segments_per_optimizer=8))
    yield running
    running.stop()
    assert os.listdir(directory) == []  # shutdown frees every segment
    os.rmdir(directory)


@pytest.fixture
def local(shm_server: RunningServer) -> Iterator[Client]:
    with Client(shm_server.address, timeout=60.0, transport="local") as connected:
        yield connected


@pytest.fixture
def stub(shm_server: RunningServer) -> Iterator[pb_grpc.OptimizerServiceStub]:
    with grpc.insecure_channel(shm_server.address) as channel:
        yield pb_grpc.OptimizerServiceStub(channel)


def _segment_of(client: Client, optimizer: str) -> ClientSegment:
    """The client's first segment of `optimizer`, opened now if it has none (used by no push yet)."""
    client.optimizer(optimizer).gradient_buffers()
    return client._local._segments[optimizer][0]


def _segments(server: RunningServer) -> int:
    return server.built.service.segments.count


def _files(server: RunningServer) -> list[str]:
    return os.listdir(server.built.service.segments.directory)


def _grads(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {key: rng.standard_normal(value.shape).astype(np.float32) for key, value in PARAMS.items()}


def _header_push(stub, header: pb.PushHeader, chunks=(), metadata=()) -> pb.PushGradientsResponse:
    messages = [pb.PushGradientsRequest(header=header), *(pb.PushGradientsRequest(chunk=c) for c in chunks)]
    return stub.PushGradients(iter(messages), timeout=30, metadata=metadata)


def _dense_header(optimizer: str, session: str) -> pb.PushHeader:
    return pb.PushHeader(optimizer=optimizer, shared_memory_session=session, gradients=[
        pb.GradientSpec(name=k, dtype=pb.DATA_TYPE_FLOAT32, shape=v.shape) for k, v in PARAMS.items()])


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_a_segment_is_owner_only_and_leaves_the_shm_dir_on_first_use(shm_server, local, name):
    optimizer = local.create_optimizer(name, PARAMS, CONFIG)
    segment = _segment_of(local, name)
    path = Path(shm_server.built.service.segments.directory) / next(iter(_files(shm_server)))
    info = path.lstat()
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
    assert path.name.startswith("optserve-") and len(path.name) == len("optserve-") + 32
    optimizer.push(_grads(0))
    assert not path.exists()  # nobody can open it any more
    assert segment.session and optimizer.pull().version == 1
    metrics = shm_server.registry.metrics
    assert metrics.bytes_received.labels(name, "shared_memory")._value.get() == sum(a.nbytes for a in PARAMS.values())
    assert metrics.bytes_sent.labels(name, "shared_memory")._value.get() > 0


def test_an_unused_name_is_unlinked_and_its_segment_freed_after_the_idle_timeout(shm_server, local, stub, name):
    local.create_optimizer(name, PARAMS)
    stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(optimizer=name), timeout=30)
    assert _segments(shm_server) >= 1
    wait_until(lambda: _files(shm_server) == [] and _segments(shm_server) == 0, "the idle segment freed", 30)
    assert shm_server.registry.metrics.shared_memory_segments._value.get() == 0


def test_trajectory_over_shared_memory_is_bitwise_the_stream_one(shm_server, local, name):
    with Client(shm_server.address, timeout=60.0, transport="grpc") as stream:
        over_shm = local.create_optimizer(name + "-shm", PARAMS, CONFIG)
        over_stream = stream.create_optimizer(name + "-grpc", PARAMS, CONFIG)
        buffers = over_shm.gradient_buffers()
        for step in range(6):
            grads = _grads(step)
            if step % 2:  # computed in place: the push copies nothing on the client
                for key, value in grads.items():
                    buffers[key][...] = value
                over_shm.push(buffers, worker_id="w", seq=step)
            else:
                over_shm.push(grads, worker_id="w", seq=step)
            over_stream.push(grads, worker_id="w", seq=step)
            for pull in (lambda o: o.pull(), lambda o: o.pull(ema=True), lambda o: o.pull_slot("m"),
                         lambda o: o.pull_slot("v"), lambda o: o.pull_slot("vhat"), lambda o: o.pull(names=["b"])):
                got, want = pull(over_shm), pull(over_stream)
                assert list(got) == list(want) and got.version == want.version == step + 1
                for key in want:
                    assert got[key].tobytes() == want[key].tobytes(), (step, key)
        views = over_shm.pull(copy=False)
        copied = over_shm.pull(into=over_shm.pull())
        assert all(views[k].tobytes() == copied[k].tobytes() for k in PARAMS)


def test_views_of_the_segment_pushed_under_other_names_are_read_before_overwritten(shm_server, local, name):
    square = {"p": np.zeros((3, 3), np.float32), "q": np.zeros((3, 3), np.float32)}
    over_shm = local.create_optimizer(name, square)
    buffers = over_shm.gradient_buffers()
    buffers["p"][...], buffers["q"][...] = 1.0, -2.0
    over_shm.push({"p": buffers["q"], "q": buffers["p"]})  # swapped
    with Client(shm_server.address, transport="grpc") as stream:
        reference = stream.create_optimizer(name + "-ref", square)
        reference.push({"p": np.full((3, 3), -2.0, np.float32), "q": np.ones((3, 3), np.float32)})
        got, want = over_shm.pull(), reference.pull()
    assert all(got[k].tobytes() == want[k].tobytes() for k in square)


def test_sparse_and_half_precision_pushes_go_by_the_stream(shm_server, local, name):
    optimizer = local.create_optimizer(name, PARAMS)
    from optserve.client import IndexedSlices

    sparse = {"w": IndexedSlices([1, 3], np.ones((2, 6), np.float32)), "b": np.ones(5, np.float32)}
    assert optimizer.push(sparse) == 1
    assert optimizer.push(_grads(1), wire_dtype="bfloat16") == 2
    assert shm_server.registry.metrics.bytes_received.labels(name, "grpc")._value.get() > 0


@pytest.mark.parametrize("change, field", [
    (lambda h: h.gradients[0].__setattr__("sparse", True), "gradients['w'].sparse"),
    (lambda h: h.gradients[0].__setattr__("dtype", pb.DATA_TYPE_FLOAT16), "gradients['w'].dtype"),
    (lambda h: h.gradients[1].shape.__setitem__(0, 6), "gradients['b'].shape"),
    (lambda h: h.gradients.pop(), "gradients"),
])
def test_a_header_the_segment_cannot_carry_is_refused(shm_server, local, stub, name, change, field):
    local.create_optimizer(name, PARAMS)
    session = _segment_of(local, name).session
    header = _dense_header(name, session)
    change(header)
    code, details = _code(lambda: _header_push(stub, header))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field)
    assert local.optimizer(name).info().version == 0


def test_a_push_from_shared_memory_carries_no_chunks(shm_server, local, stub, name):
    local.create_optimizer(name, PARAMS)
    session = _segment_of(local, name).session
    code, details = _code(lambda: _header_push(stub, _dense_header(name, session), [b"\0" * 4]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("chunks")


def test_sessions_are_bound_to_their_optimizer_and_die_with_close_and_delete(shm_server, local, stub, name):
    local.create_optimizer(name + "-a", PARAMS)
    local.create_optimizer(name + "-b", PARAMS)
    session = _segment_of(local, name + "-a").session
    code, details = _code(lambda: _header_push(stub, _dense_header(name + "-b", session)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("shared_memory_session")
    code, _ = _code(lambda: stub.PullWeights(pb.PullWeightsRequest(optimizer=name + "-b",
                                                                   shared_memory_session=session)).next())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = _code(lambda: _header_push(stub, _dense_header(name + "-a", "shm-" + "0" * 32)))
    assert code == grpc.StatusCode.NOT_FOUND
    stub.CloseSharedMemory(pb.CloseSharedMemoryRequest(session=session), timeout=30)
    code, details = _code(lambda: _header_push(stub, _dense_header(name + "-a", session)))
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("shared_memory_session")
    opened = stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(optimizer=name + "-b"), timeout=30)
    local.delete_optimizer(name + "-b")
    assert opened.session not in shm_server.built.service.segments._segments
    assert local.optimizer(name + "-a").info().version == 0


def test_a_forgotten_session_is_reopened_transparently(shm_server, local, name):
    optimizer = local.create_optimizer(name, PARAMS)
    optimizer.push(_grads(0))
    first = _segment_of(local, name)
    wait_until(lambda: first.session not in shm_server.built.service.segments._segments, "the idle timeout", 30)
    assert optimizer.push(_grads(1)) == 2 and optimizer.pull().version == 2
    assert _segment_of(local, name) is not first


def test_opens_are_bounded_per_optimizer_and_in_all(shm_server, local, stub, name):
    for suffix in ("-a", "-b"):
        local.create_optimizer(name + suffix, PARAMS)
    outcomes = []
    for index in range(200):
        try:
            stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(optimizer=name + ("-a" if index < 100 else "-b")),
                                  timeout=30)
            outcomes.append("ok")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            outcomes.append("refused")
    assert outcomes[:100].count("ok") <= 8 and outcomes.count("ok") <= 12
    assert _segments(shm_server) <= 12
    wait_until(lambda: _segments(shm_server) == 0 and _files(shm_server) == [], "the idle segments freed", 30)


def test_a_crashed_servers_named_segment_files_are_swept_at_start():
    directory = Path(_shm_dir())
    orphan, fresh = (directory / f"optserve-{c * 32}" for c in "ab")
    for path in (orphan, fresh):
        path.write_bytes(b"x")
    os.utime(orphan, (1, 1))
    running = RunningServer(ServerOptions(host="127.0.0.1", port=0, shm_dir=str(directory)))
    try:
        assert not orphan.exists() and fresh.exists()  # a live server's unused name may be fresh: kept
    finally:
        running.stop()
        shutil.rmtree(directory)


def test_segment_bytes_are_bounded():
    directory = _shm_dir()
    running = RunningServer(ServerOptions(host="127.0.0.1", port=0, shm_dir=directory, shm_max_bytes=700_000))
    try:
        with Client(running.address, transport="local") as client:
            client.create_optimizer("big", {"w": np.zeros(100_000, np.float32)})
            with pytest.raises(OptserveError) as refused:
                client.optimizer("big").push({"w": np.ones(100_000, np.float32)})
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with Client(running.address, transport="auto") as client:  # auto: the stream instead
            assert client.optimizer("big").push({"w": np.ones(100_000, np.float32)}) == 1
        assert os.listdir(directory) == []
    finally:
        running.stop()
        shutil.rmtree(directory)


def test_a_caller_without_the_token_opens_nothing_and_moves_no_byte(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n{OTHER_TOKEN}\n")
    directory = _shm_dir()
    running = RunningServer(ServerOptions(host="127.0.0.1", port=0, shm_dir=directory, token_file=str(tokens)))
    try:
        with Client(running.address, transport="local", token=TOKEN) as owner:
            optimizer = owner.create_optimizer("guarded", PARAMS)
            segment = _segment_of(owner, "guarded")
            with grpc.insecure_channel(running.address) as channel:
                stub = pb_grpc.OptimizerServiceStub(channel)
                code, _ = _code(lambda: stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(optimizer="guarded")))
                assert code == grpc.StatusCode.UNAUTHENTICATED
                assert len(os.listdir(directory)) == 1 and running.built.service.segments.count == 1
                for metadata, want in [((), grpc.StatusCode.UNAUTHENTICATED),
                                       ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
                                       ((("authorization", f"Bearer {OTHER_TOKEN}"),), grpc.StatusCode.NOT_FOUND)]:
                    code, _ = _code(lambda: _header_push(stub, _dense_header("guarded", segment.session),
                                                         metadata=metadata))
                    assert code == want
                    code, _ = _code(lambda: stub.PullWeights(pb.PullWeightsRequest(
                        optimizer="guarded", shared_memory_session=segment.session), metadata=metadata).next())
                    assert code == want
                    code, _ = _code(lambda: stub.CloseSharedMemory(
                        pb.CloseSharedMemoryRequest(session=segment.session), metadata=metadata))
                    assert code == want
            received = running.registry.metrics.bytes_received.labels("guarded", "shared_memory")._value.get()
            assert received == 0 and optimizer.info().version == 0
            assert optimizer.push(_grads(0)) == 1  # the owner still can
    finally:
        running.stop()
        shutil.rmtree(directory)


def test_non_finite_bytes_in_the_segment_are_refused(shm_server, local, name):
    optimizer = local.create_optimizer(name, PARAMS, non_finite_policy="refuse")
    buffers = optimizer.gradient_buffers()
    for value in buffers.values():
        value[...] = 1.0
    buffers["b"][2] = np.nan
    with pytest.raises(OptserveError) as refused:
        optimizer.push(buffers)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    weights = optimizer.pull()
    assert weights.version == 0 and all(weights[k].tobytes() == PARAMS[k].tobytes() for k in PARAMS)


def test_a_non_finite_value_past_the_first_block_is_refused_naming_its_tensor(shm_server, local, name):
    """The push measures every block of the segment (in place, or as it copies it): a NaN deep in a large tensor
    is caught."""
    from optserve.server.overflow import BLOCK

    params = {"small": np.zeros(3, np.float32), "large": np.zeros(3 * BLOCK + 5, np.float32)}
    optimizer = local.create_optimizer(name, params, non_finite_policy="refuse")
    buffers = optimizer.gradient_buffers()
    for value in buffers.values():
        value[...] = 0.5
    buffers["large"][2 * BLOCK + 1] = np.inf
    with pytest.raises(OptserveError) as refused:
        optimizer.push(buffers)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'large'" in refused.value.details()
    buffers["large"][2 * BLOCK + 1] = 0.5
    assert optimizer.push(buffers) == 1


def test_the_gradient_norm_metric_of_a_segment_push_is_the_gradients_norm(tmp_path):
    """The norm comes from the sums of squares measured as the segment was copied, trainable tensors only."""
    running = RunningServer(ServerOptions(host="127.0.0.1", port=0, shm_dir=_shm_dir(), metrics_port=0))
    try:
        with Client(running.address, timeout=60.0, transport="local") as client:
            optimizer = client.create_optimizer("norm", PARAMS)
            grads = _grads(3)
            optimizer.push(grads)
            metrics = running.registry.metrics
            assert metrics.bytes_received.labels("norm", "shared_memory")._value.get() > 0  # it came by the segment
            expected = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values())))
            assert metrics.grad_norm.labels("norm")._value.get() == pytest.approx(expected, rel=1e-5)
    finally:
        directory = running.built.service.segments.directory
        running.stop()
        shutil.rmtree(directory)


def test_concurrent_pushes_on_one_session_are_refused_not_mixed(shm_server, local, stub, name):
    local.create_optimizer(name, PARAMS)
    segment = _segment_of(local, name)
    service = shm_server.built.service.segments
    with service.use(segment.session, shm_server.registry.get(name), service._segments[segment.session].owner,
                     "push"):
        code, details = _code(lambda: _header_push(stub, _dense_header(name, segment.session)))
    assert code == grpc.StatusCode.ABORTED and "one at a time" in details
    assert local.optimizer(name).info().version == 0


def test_sync_rounds_over_shared_memory_keep_each_workers_gradient(shm_server, name):
    clients = [Client(shm_server.address, transport="local") for _ in range(2)]
    try:
        optimizer = clients[0].create_optimizer(name, PARAMS, mode="sync", num_workers=2)
        results = {}

        def work(index: int) -> None:
            results[index] = clients[index].optimizer(name).push(_grads(index), worker_id=f"w{index}", base_version=0)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert results == {0: 1, 1: 1}
        with Client(shm_server.address, transport="grpc") as stream:
            reference = stream.create_optimizer(name + "-ref", PARAMS)
            mean = {k: (_grads(0)[k] + _grads(1)[k]) / 2 for k in PARAMS}
            reference.push(mean)
            got, want = optimizer.pull(), reference.pull()
            assert all(np.allclose(got[k], want[k], rtol=1e-6, atol=1e-7) for k in PARAMS)
    finally:
        for client in clients:
            client.close()


def test_threads_of_one_client_push_at_once_each_through_a_segment_or_the_stream(shm_server, local, name):
    optimizer = local.create_optimizer(name, PARAMS)
    errors = []

    def work(worker: int) -> None:
        try:
            for seq in range(5):
                optimizer.push(_grads(worker * 10 + seq), worker_id=f"w{worker}", seq=seq)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == [] and optimizer.info().version == 30
    assert 1 <= len(local._local._segments[name]) <= 4


DEAD_CLIENT = textwrap.dedent("""
    import sys, time, numpy as np
    from optserve.client import Client
    client = Client(sys.argv[1], transport="local")
    optimizer = client.optimizer(sys.argv[2])
    optimizer.push({"w": np.ones((4, 6), np.float32), "b": np.ones(5, np.float32)})
    print("pushed", flush=True)
    time.sleep(600)
""")


def test_a_killed_clients_segment_is_reclaimed_after_the_idle_timeout(shm_server, local, name):
    local.create_optimizer(name, PARAMS)
    child = subprocess.Popen([sys.executable, "-c", DEAD_CLIENT, shm_server.address, name], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "pushed"
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        wait_until(lambda: _segments(shm_server) == 0, "the dead client's segment freed", 30)
        assert _files(shm_server) == [] and shm_server.registry.metrics.shared_memory_segments._value.get() == 0
        assert local.optimizer(name).info().version == 1
    finally:
        child.kill()
        child.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_in_memory_async_step_reads_the_segment_in_place(shm_server, local, name, monkeypatch):
    """No private copy where nothing outlives the step: the step's gradient buffer is the segment's memory."""
    from optserve.server.engine import pipeline

    optimizer = local.create_optimizer(name, PARAMS, CONFIG)
    buffers = optimizer.gradient_buffers()
    for key, value in _grads(3).items():
        buffers[key][...] = value
    stepped = []
    flat_grads = pipeline.flat_grads
    monkeypatch.setattr(pipeline, "flat_grads", lambda layout, grads: stepped.append(flat_grads(layout, grads)) or
                        stepped[-1])
    assert optimizer.push(buffers) == 1
    (segment,) = [s for s in shm_server.built.service.segments._segments.values() if s.optimizer_name == name]
    assert stepped[-1].dense.unsafe_buffer_pointer() == segment.gradients_in_place()[0].ctypes.data
    stepped.clear()


@pytest.mark.parametrize("rewrite", [np.nan, np.inf, 3e38], ids=["nan", "inf", "huge"])
def test_bytes_rewritten_after_the_measure_are_read_as_zero_not_stepped(shm_server, local, name, monkeypatch,
                                                                      rewrite):
    """The race a hostile same-host client can win, made certain: the push is measured finite, then the client
    writes a non-finite or huge value before the step. The state stays finite, and the step is the one a
    gradient with 0 there gives."""
    from optserve.server.shared_memory import Segment

    measured = Segment.gradients_in_place

    def raced(self, *args, **kwargs):
        region, magnitudes = measured(self, *args, **kwargs)
        region[self.layout.offsets["w"] + 7] = rewrite  # after the measure, before the step
        return region, magnitudes

    monkeypatch.setattr(Segment, "gradients_in_place", raced)
    grads = _grads(4)
    optimizer = local.create_optimizer(name, PARAMS, CONFIG, non_finite_policy="refuse")
    buffers = optimizer.gradient_buffers()
    for key, value in grads.items():
        buffers[key][...] = value
    assert optimizer.push(buffers) == 1
    stepped = optimizer.pull()
    assert all(np.isfinite(stepped[key]).all() for key in PARAMS)
    monkeypatch.setattr(Segment, "gradients_in_place", measured)
    with Client(shm_server.address, timeout=60.0, transport="network") as network:
        reference = network.create_optimizer(name + "-ref", PARAMS, CONFIG, non_finite_policy="refuse")
        zeroed = {key: value.copy() for key, value in grads.items()}
        zeroed["w"].reshape(-1)[7] = 0.0
        reference.push(zeroed)
        expected = reference.pull()
        network.delete_optimizer(name + "-ref")
    assert all(stepped[key].tobytes() == expected[key].tobytes() for key in PARAMS)


def test_a_segment_freed_between_the_measure_and_the_step_is_still_read_whole(shm_server, local, name,
                                                                              monkeypatch):
    """Deleting the optimizer's segments (a delete, the idle reaper) while an in-place push is in flight unmaps
    nothing the step still reads: the step's views keep the mapping, and it gives the stream's numbers."""
    from optserve.server.shared_memory import Segment

    table = shm_server.built.service.segments
    measured = Segment.gradients_in_place

    def freed(self, *args, **kwargs):
        region, magnitudes = measured(self, *args, **kwargs)
        table.forget(self.optimizer)  # every segment of the optimizer freed, this one included
        return region, magnitudes

    monkeypatch.setattr(Segment, "gradients_in_place", freed)
    grads = _grads(6)
    optimizer = local.create_optimizer(name, PARAMS, CONFIG)
    buffers = optimizer.gradient_buffers()
    for key, value in grads.items():
        buffers[key][...] = value
    assert optimizer.push(buffers) == 1
    monkeypatch.setattr(Segment, "gradients_in_place", measured)
    assert not [s for s in table._segments.values() if s.optimizer_name == name]
    stepped = local.optimizer(name).pull()  # a new segment is opened transparently
    with Client(shm_server.address, timeout=60.0, transport="network") as network:
        reference = network.create_optimizer(name + "-ref", PARAMS, CONFIG)
        reference.push(grads)
        expected = reference.pull()
        network.delete_optimizer(name + "-ref")
    assert all(stepped[key].tobytes() == expected[key].tobytes() for key in PARAMS)


@pytest.mark.parametrize("kind", ["sync", "log", "non_trainable"])
def test_a_push_whose_gradient_outlives_its_step_copies_the_segment(tmp_path, kind):
    """A sync round, a write-ahead log and assigned values keep what the push carried: those read a private copy."""
    directory = _shm_dir()
    options = dict(host="127.0.0.1", port=0, shm_dir=directory)
    if kind == "log":
        options["data_dir"] = str(tmp_path)
    running = RunningServer(ServerOptions(**options))
    try:
        with Client(running.address, timeout=60.0, transport="local") as client:
            extra = {"mode": "sync", "num_workers": 1} if kind == "sync" else {}
            if kind == "non_trainable":
                extra = {"state": {"count": np.zeros(2, np.float32)}}
            client.create_optimizer("copied", PARAMS, CONFIG, **extra)
            assert not running.registry.get("copied").reads_segments_in_place
            client.create_optimizer("in-place", PARAMS, CONFIG)
            assert (kind == "log") != running.registry.get("in-place").reads_segments_in_place
    finally:
        running.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_a_client_rewriting_the_segment_mid_push_cannot_split_log_and_step(tmp_path):
    """Whatever bytes the server copied, the log replayed after a crash gives the weights it served."""
    directory = _shm_dir()
    args = ["--data-dir", str(tmp_path / "data"), "--shm-dir", directory, "--checkpoint-every", "100000",
            "--checkpoint-interval", "100000"]
    port = _free_port()
    server = ServerProcess([*args, "--port", str(port)])
    try:
        with Client(server.address, transport="local") as client:
            optimizer = client.create_optimizer("scribbled", {"w": np.zeros(200_000, np.float32)},
                                                {"learning_rate": 0.1})
            buffers = optimizer.gradient_buffers()
            stop = threading.Event()

            def scribble() -> None:  # a hostile writer racing every push, always finite
                rng = np.random.default_rng(0)
                while not stop.is_set():
                    buffers["w"][rng.integers(0, 200_000, 1000)] = rng.standard_normal(1000, np.float32)

            writer = threading.Thread(target=scribble)
            writer.start()
            try:
                for seq in range(20):
                    optimizer.push(buffers, worker_id="w", seq=seq)
            finally:
                stop.set()
                writer.join(30)
            served = optimizer.pull()
        server.process.kill()  # a crash: no checkpoint, the log is all there is
        server.process.wait(30)
        server = ServerProcess([*args, "--port", str(port)])
        with Client(server.address, transport="local") as client:
            replayed = client.optimizer("scribbled").pull()
            assert replayed.version == served.version == 20
            assert replayed["w"].tobytes() == served["w"].tobytes()
            # exactly-once across the restart: the session is new, the retry is answered, not applied
            again = client.optimizer("scribbled").push({"w": np.ones(200_000, np.float32)}, worker_id="w", seq=19)
            assert again.duplicate and client.optimizer("scribbled").info().version == 20
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare -m (a private mount namespace)")
def test_a_server_in_another_mount_namespace_is_not_the_same_host():
    directory = _shm_dir()  # the server mounts its own tmpfs over it: its files are not ours
    prefix = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"', directory]
    server = ServerProcess(["--shm-dir", directory], prefix=prefix)
    try:
        with Client(server.address, transport="auto") as auto:
            optimizer = auto.create_optimizer("elsewhere", PARAMS)
            assert optimizer.push(_grads(0)) == 1 and optimizer.pull().version == 1
            assert auto._local._segments["elsewhere"] == NOT_SAME_HOST
            assert set(optimizer.gradient_buffers()) == set(PARAMS)  # plain arrays
        with Client(server.address, transport="local") as local:
            with pytest.raises(OptserveError) as refused:
                local.optimizer("elsewhere").push(_grads(1))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "transport 'local'" in refused.value.details()
    finally:
        server.stop()
        os.rmdir(directory)


def test_a_server_without_shm_serves_auto_clients_over_the_stream():
    running = RunningServer(ServerOptions(host="127.0.0.1", port=0, shm_dir=""))
    try:
        with Client(running.address, transport="auto") as auto:
            optimizer = auto.create_optimizer("plain", PARAMS)
            assert optimizer.push(_grads(0)) == 1 and optimizer.pull(copy=False).version == 1
        with Client(running.address, transport="local") as local, pytest.raises(OptserveError) as refused:
            local.optimizer("plain").pull()
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        running.stop()


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(session=st.text(max_size=300))
def test_fuzz_random_sessions_are_refused_cleanly(shm_server, stub, session):
    name = "fuzz-sessions"
    if name not in {o.name for o in shm_server.registry.list()}:
        shm_server.registry.create(name, {}, PARAMS)
    code, _ = _code(lambda: _header_push(stub, _dense_header(name, session)))
    assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    code, _ = _code(lambda: stub.PullWeights(pb.PullWeightsRequest(optimizer=name,
                                                                   shared_memory_session=session)).next())
    assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert shm_server.registry.get(name).version == 0


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(size=st.one_of(st.sampled_from([8232, 8192, 4096]), st.integers(-10, 1 << 20)),
       gradients_offset=st.one_of(st.sampled_from([0, 64, 4096]), st.integers(-(1 << 40), 1 << 40)),
       weights_offset=st.one_of(st.sampled_from([64, 4096, 8000]), st.integers(-(1 << 40), 1 << 40)),
       nonce=st.one_of(st.just(b"N" * 32), st.binary(max_size=40)),
       shape=st.lists(st.integers(0, 40), max_size=3))
def test_fuzz_a_client_maps_only_a_consistent_segment(tmp_path_factory, size, gradients_offset, weights_offset,
                                                      nonce, shape):
    path = tmp_path_factory.mktemp("segment") / "file"
    path.write_bytes(b"N" * 40 + b"\0" * 8192)
    reply = pb.SharedMemorySegment(session="s", path=str(path), size=size, nonce=nonce,
                                   gradients_offset=gradients_offset, weights_offset=weights_offset,
                                   tensors=[pb.TensorSpec(name="t", dtype=pb.DATA_TYPE_FLOAT32, shape=shape)])
    try:
        segment = ClientSegment(reply)
    except (OSError, ValueError, OverflowError):
        return
    nbytes = segment.layout.nbytes
    assert nonce == b"N" * len(nonce) and len(nonce) >= 16 and 0 < size <= 8232
    assert len(nonce) <= min(gradients_offset, weights_offset) and max(gradients_offset, weights_offset) + nbytes <= size
    assert abs(gradients_offset - weights_offset) >= nbytes
    segment.close()
