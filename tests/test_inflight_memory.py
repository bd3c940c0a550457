"""Memory for a stream is committed as its bytes arrive, under one budget for all requests in flight
(issue 10, item 11): a header alone reserves nothing, a sync round's gradients count until the round is
applied, a request over the budget is RESOURCE_EXHAUSTED and changes nothing, and a server under a memory
cap answers a huge declaration with a status, never INTERNAL."""

import resource
import threading

import grpc
import numpy as np
import pytest

from optserve.client import Client, IndexedSlices, OptserveError
from optserve.server.launch import ServerProcess
from optserve.server.options import ServerOptions
from optserve.v1 import optserve_pb2 as pb
from optserve.v1 import optserve_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, wait_until

MiB = 1 << 20
CHUNK = pb.PushGradientsRequest(chunk=bytes(MiB))



def inflight(server: RunningServer) -> float | None:
    return server.registry.metrics.registry.get_sample_value("optserve_inflight_bytes")


def dense_header(optimizer: str, elements: int) -> pb.PushGradientsRequest:
    spec = pb.GradientSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=[elements])
    return pb.PushGradientsRequest(header=pb.PushHeader(optimizer=optimizer, gradients=[spec]))


def stalled_push(stub, header: pb.PushGradientsRequest, before: int, after: int, go: threading.Event):
    """A push stream that sends the header and `before` MiB, waits for `go`, then sends `after` MiB."""
    def messages():
        yield header
        yield from [CHUNK] * before
        go.wait(60)
        yield from [CHUNK] * after

    return stub.PushGradients.future(messages(), timeout=120)


@pytest.fixture
def budget_server():
    running = RunningServer(ServerOptions(host="127.0.0.1", port=0, max_inflight_bytes=10 * MiB))
    yield running
    running.stop()


def test_streams_are_charged_as_their_bytes_arrive_and_one_over_the_budget_is_refused(budget_server, name):
    elements = MiB  # a 4 MiB tensor
    with Client(budget_server.address, timeout=60) as client:
        opt = client.create_optimizer(name, {"w": np.zeros(elements, np.float32)}, {"learning_rate": 0.1})
        stub = pb_grpc.OptimizerServiceStub(client._channel)
        go = threading.Event()
        try:
            idle = stalled_push(stub, dense_header(name, elements), 0, 0, go)  # a header alone holds nothing
            slow = [stalled_push(stub, dense_header(name, elements), 3, 1, go) for _ in range(2)]
            wait_until(lambda: inflight(budget_server) == 8 * MiB, "two streams to hold 4 MiB each")
            with pytest.raises(OptserveError) as caught:
                opt.push({"w": np.ones(elements, np.float32)})
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "gradients" in caught.value.details() and "max_inflight_bytes" in caught.value.details()
            assert opt.info().version == 0
        finally:
            go.set()
        assert sorted(call.result(timeout=60).version for call in slow) == [1, 2]
        with pytest.raises(grpc.RpcError) as short:
            idle.result(timeout=60)
        assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert opt.push({"w": np.ones(elements, np.float32)}) == 3
        wait_until(lambda: inflight(budget_server) == 0, "every stream's bytes to be released")


def test_a_sync_round_holds_its_gradients_against_the_budget_until_it_is_applied(budget_server, name):
    rows = MiB // 4  # rows of 4 floats: a 4 MiB tensor
    params = {"emb": np.zeros((rows, 4), np.float32)}
    with Client(budget_server.address, timeout=60) as client:
        sync = client.create_optimizer(name, {"emb": np.zeros((rows, 4), np.float32)}, mode="sync",
                                       num_workers=3, sync_timeout=600)
        other = client.create_optimizer(name + "-other", params)
        dense = np.full((rows, 4), 0.5, np.float32)  # 4 MiB
        results = []
        workers = [threading.Thread(target=lambda w=w: results.append(
            sync.push({"emb": dense}, worker_id=w, base_version=0))) for w in ("a", "b")]
        for worker in workers:
            worker.start()
        wait_until(lambda: sync.info().pending_gradients == 2, "two gradients in the round")
        assert inflight(budget_server) == 8 * MiB  # the round holds them, though no byte is arriving
        with pytest.raises(OptserveError) as caught:
            other.push({"emb": dense})
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert other.info().version == 0
        closing = sync.push({"emb": IndexedSlices(np.array([0]), np.ones((1, 4), np.float32))},
                            worker_id="c", base_version=0)
        for worker in workers:
            worker.join(60)
        assert closing == 1 and results == [1, 1]
        wait_until(lambda: inflight(budget_server) == 0, "the round to release its gradients")
        assert other.push({"emb": dense}) == 1


def test_deleting_an_optimizer_releases_the_gradients_of_its_open_round(budget_server, name):
    params = {"w": np.zeros(MiB, np.float32)}
    with Client(budget_server.address, timeout=60) as client:
        client.create_optimizer(name, params, mode="sync", num_workers=2, sync_timeout=600)
        with Client(budget_server.address, timeout=60) as patient, pytest.raises(OptserveError) as caught:
            patient.timeout = 3.0
            patient.optimizer(name).push({"w": np.ones(MiB, np.float32)}, worker_id="a", base_version=0)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert inflight(budget_server) == 4 * MiB  # the call has ended; its gradient waits in the round
        client.delete_optimizer(name)
        wait_until(lambda: inflight(budget_server) == 0, "the deleted round to release its gradient")


def test_a_request_larger_than_the_budget_is_refused_at_its_header(budget_server, name):
    with Client(budget_server.address, timeout=60) as client:
        stub = pb_grpc.OptimizerServiceStub(client._channel)
        spec = pb.TensorSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=[4 * MiB])  # 16 MiB
        request = pb.CreateOptimizerRequest(header=pb.CreateOptimizerHeader(name=name, tensors=[spec]))
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateOptimizer(iter([request]), timeout=60)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tensors" in caught.value.details() and "max_inflight_bytes" in caught.value.details()
        assert client.list_optimizers() == [] or name not in [o.name for o in client.list_optimizers()]


# A real server process under an address-space cap (RLIMIT_AS): today's main reserved a huge declaration's
# bytes when the header arrived, and the failed allocation came back as INTERNAL.

CAP = 5 << 29  # 2.5 GiB of address space; the idle server needs about 0.7 GiB with two malloc arenas
HUGE = 1 << 30  # elements: a 4 GiB tensor


@pytest.fixture
def capped_server(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # each glibc arena reserves 64 MiB of address space
    monkeypatch.setenv("OPTSERVE_MAX_INFLIGHT_BYTES", str(64 << 30))  # only the cap limits: the lazy path
    # few threads: each reserves its stack in the capped address space (the pool is --max-streams + 40)
    with ServerProcess(["--max-streams", "8", "--max-waiting-calls", "8"]) as process:
        resource.prlimit(process.process.pid, resource.RLIMIT_AS, (CAP, CAP))  # for every mapping from now on
        yield process


def _raw_call(stub_method, messages) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub_method(iter(messages), timeout=120)
    return caught.value


def test_huge_declarations_under_a_memory_cap_get_a_status_and_the_server_keeps_serving(capped_server, name):
    with Client(capped_server.address, timeout=120) as client:
        opt = client.create_optimizer(name, {"emb": np.zeros((8, 4), np.float32)}, {"learning_rate": 0.1})
        stub = pb_grpc.OptimizerServiceStub(client._channel)
        create = pb.CreateOptimizerRequest(header=pb.CreateOptimizerHeader(
            name=name + "-huge", tensors=[pb.TensorSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=[HUGE])]))
        error = _raw_call(stub.CreateOptimizer, [create, pb.CreateOptimizerRequest(chunk=b"\0" * 64)])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "stream ended after 64 of the 4294967296 bytes" in error.details()
        sparse = pb.PushGradientsRequest(header=pb.PushHeader(optimizer=name, gradients=[pb.GradientSpec(
            name="emb", dtype=pb.DATA_TYPE_FLOAT32, shape=[HUGE // 4, 4], sparse=True,
            index_dtype=pb.DATA_TYPE_INT32)]))
        error = _raw_call(stub.PushGradients, [sparse, pb.PushGradientsRequest(chunk=b"\0" * 64)])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        sent = []

        def beyond_the_cap():  # the bytes really come: the buffer grows until the cap refuses it
            yield sparse
            for _ in range(2048):
                sent.append(1)
                yield CHUNK

        error = _raw_call(stub.PushGradients, beyond_the_cap())
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "gradients" in error.details() and len(sent) < 2048
        assert opt.info().version == 0
        with pytest.raises(OptserveError) as caught:  # 600 MiB arrive, but the state needs three times that
            client.create_optimizer(name + "-big", {"w": np.zeros(150 * MiB, np.float32)})
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
        assert opt.push({"emb": np.ones((8, 4), np.float32)}) == 1
        assert [o.name for o in client.list_optimizers()] == [name]
    assert capped_server.process.poll() is None
    assert not [line for line in capped_server.lines if "internal error" in line]
