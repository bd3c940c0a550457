"""Server limits on what one create may declare: the tensor count and the length of tensor names."""

import grpc
import numpy as np
import pytest

from optserve.client import Client
from optserve.server.options import ServerOptions
from optserve.v1 import optserve_pb2 as pb
from optserve.v1 import optserve_pb2_grpc as pb_grpc
from tests.conftest import RunningServer
from tests.test_bad_input import expect_error, expect_raw_error

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def small() -> RunningServer:
    """A server that holds at most 8 tensors per optimizer."""
    running = RunningServer(ServerOptions(host="127.0.0.1", port=0, max_tensors=8))
    yield running
    running.stop()


def _tiny(count: int) -> dict:
    return {f"t{i}": np.full(1, float(i), np.float32) for i in range(count)}


def test_create_over_the_tensor_limit_is_resource_exhausted_and_creates_nothing(small: RunningServer) -> None:
    with Client(small.address, timeout=60) as client:
        expect_error(EXHAUSTED, "tensors: 9 tensors exceed this server's limit of 8 per optimizer",
                     client.create_optimizer, "nine", _tiny(9))
        assert client.list_optimizers() == []
        opt = client.create_optimizer("eight", _tiny(8), {"learning_rate": 0.1})  # at the limit: works
        opt.push({f"t{i}": np.ones(1, np.float32) for i in range(8)})
        assert opt.info().iterations == 1
        client.delete_optimizer("eight")


def test_default_tensor_limit_refuses_ten_thousand_tiny_tensors(client: Client, name: str) -> None:
    """The audit's 10,000 one-element tensors: refused from the header, before any data is read."""
    stub = pb_grpc.OptimizerServiceStub(client._channel)
    specs = [pb.TensorSpec(name=f"t{i}", dtype=pb.DATA_TYPE_FLOAT32, shape=[1]) for i in range(10_000)]
    request = pb.CreateOptimizerRequest(header=pb.CreateOptimizerHeader(name=name, tensors=specs))
    expect_raw_error(EXHAUSTED, "tensors: 10000 tensors exceed this server's limit of 1024",
                     stub.CreateOptimizer, iter([request]))
    assert name not in [info.name for info in client.list_optimizers()]


@pytest.fixture
def persistent(tmp_path) -> RunningServer:
    running = RunningServer(ServerOptions(host="127.0.0.1", port=0, data_dir=str(tmp_path)))
    yield running
    running.stop()


def test_tensor_name_over_1024_bytes_is_refused_naming_the_field(persistent: RunningServer) -> None:
    with Client(persistent.address, timeout=60) as client:
        error = expect_error(INVALID, "tensors[1].name: at most 1024 bytes of UTF-8, got 71680",
                             client.create_optimizer, "long",
                             {"w": np.ones(2, np.float32), "n" * 70 * 1024: np.ones(2, np.float32)})
        assert len(error.details()) < 300  # the name is not echoed whole
        expect_error(INVALID, "tensors[0].name: at most 1024 bytes of UTF-8, got 1026", client.create_optimizer,
                     "long", {"é" * 513: np.ones(2, np.float32)})
        assert client.list_optimizers() == []
        at_limit = {"é" * 512: np.ones(2, np.float32), "x" * 1024: np.ones(2, np.float32)}  # 1024 bytes each
        opt = client.create_optimizer("long", at_limit, {"learning_rate": 0.1})
        opt.push({name: np.ones(2, np.float32) for name in at_limit})
        assert opt.save() == 1
        assert set(opt.pull()) == set(at_limit)


def test_push_with_a_huge_gradient_name_is_refused_without_echoing_it(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, {"w": np.ones(2, np.float32)})
    error = expect_error(INVALID, "gradients[0].name: at most 1024 bytes", opt.push,
                         {"g" * 70 * 1024: np.ones(2, np.float32)})
    assert len(error.details()) < 300
    assert opt.info().version == 0
    client.delete_optimizer(name)
