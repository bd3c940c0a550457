"""A pooled receive buffer belongs to the data it holds until that data is consumed (issue 10, item 1).

A sync round keeps a worker's gradient after the worker's call has ended (its
client gave up waiting for the round): the buffer the gradient arrived in must
stay the round's until the round is applied, whatever push comes next.
"""

import threading

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optserve.client import Client, OptserveError
from optserve.wire.layout import ALIGNMENT, ChunkBuffer, padded_bytes
from optserve.server.buffers import GRANULE, BufferPool, MemoryBudget
from optserve.server.errors import InvalidArgument
from optserve.server.options import ServerOptions
from tests.conftest import RunningServer, wait_until



def refused(server: RunningServer, name: str, reason: str) -> float:
    value = server.registry.metrics.registry.get_sample_value(
        "optserve_pushes_refused_total", {"optimizer": name, "reason": reason})
    return value or 0.0


@pytest.fixture
def own_server():
    """A server of its own, so the test knows every buffer its pool holds."""
    running = RunningServer(ServerOptions(host="127.0.0.1", port=0))
    yield running
    running.stop()


def test_sync_round_keeps_the_gradient_of_a_worker_whose_call_timed_out(own_server: RunningServer, name: str):
    shape = (1 << 18,)  # 1 MiB of float32: one pool granule, so every push below wants the same buffer size
    rng = np.random.default_rng(10)
    grad_a, grad_b, other = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    params = {"w": rng.standard_normal(shape).astype(np.float32)}
    config = {"learning_rate": 0.01}
    with Client(own_server.address, timeout=60) as client:
        sync = client.create_optimizer(name, params, config, mode="sync", num_workers=2, sync_timeout=600)
        bystander = client.create_optimizer(name + "-bystander", params, config)
        reference = client.create_optimizer(name + "-reference", params, config)
        with Client(own_server.address, timeout=60) as patient, pytest.raises(OptserveError) as caught:
            patient.timeout = 3.0  # shorter than the round takes: the call ends, the gradient stays in the round
            patient.optimizer(name).push({"w": grad_a}, worker_id="a", base_version=0)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: refused(own_server, name, "deadline_exceeded") + refused(own_server, name, "cancelled") == 1,
                   "the server to end worker a's call")  # whichever the server saw first: its deadline or the cancel
        assert sync.info().pending_gradients == 1
        bystander.push({"w": other})  # same size, another optimizer: it wants a buffer the pool has free
        assert sync.push({"w": grad_b}, worker_id="b", base_version=0) == 1
        reference.push({"w": (grad_a + grad_b) / np.float32(2)})  # what the round must have applied
        np.testing.assert_array_equal(sync.pull()["w"], reference.pull()["w"])
        np.testing.assert_array_equal(sync.pull_slot("v")["w"], reference.pull_slot("v")["w"])


def sync_round(sync, grad: dict, version: int) -> None:
    """Workers a and b push for `version`; a waits in the round until b closes it."""
    first = threading.Thread(target=sync.push, args=(grad,), kwargs={"worker_id": "a", "base_version": version})
    first.start()
    wait_until(lambda: sync.info().pending_gradients == 1, "worker a in the round")
    assert sync.push(grad, worker_id="b", base_version=version) == version + 1
    first.join(60)


def test_steady_pushes_pulls_and_rounds_write_into_warm_buffers(own_server: RunningServer, name: str, monkeypatch):
    from optserve.server import buffers

    mapped = []
    fresh = buffers._mapped
    monkeypatch.setattr(buffers, "_mapped", lambda size: (mapped.append(size), fresh(size))[1])
    shape = (1 << 20,)  # 4 MiB
    grad = {"w": np.full(shape, 1e-3, np.float32)}
    with Client(own_server.address, timeout=60) as client:
        opt = client.create_optimizer(name, {"w": np.zeros(shape, np.float32)})
        sync = client.create_optimizer(name + "-sync", {"w": np.zeros(shape, np.float32)}, mode="sync",
                                       num_workers=2, sync_timeout=600)
        weights = opt.pull()
        opt.push(grad)
        sync_round(sync, grad, 0)  # the first round maps a buffer for each worker
        warm = len(mapped)
        for version in range(1, 4):
            opt.push(grad)
            weights = opt.pull(into=weights)
            sync_round(sync, grad, version)
        assert len(mapped) == warm, f"steady traffic mapped fresh buffers: {mapped[warm:]}"
        assert opt.info().version == 4 and sync.info().version == 4


@settings(max_examples=40, deadline=None, database=None)
@given(sizes=st.lists(st.integers(0, 3 * GRANULE + 5) | st.integers(0, 300), min_size=1, max_size=5),
       cuts=st.lists(st.integers(1, 2 * GRANULE), min_size=1, max_size=8), warm=st.booleans())
def test_a_buffer_that_grows_as_bytes_arrive_keeps_every_byte_in_its_place(sizes, cuts, warm) -> None:
    """Growing (mremap, or a warm pooled buffer of the final size) never loses or misplaces a byte."""
    rng = np.random.default_rng(len(sizes) * 31 + sum(cuts))
    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    stream = memoryview(b"".join(p.tobytes() for p in parts))
    budget = MemoryBudget(1 << 30)
    pool = BufferPool(budget)
    if warm:  # a finished request left a buffer of exactly this size, full of its own bytes
        with pool.lease("gradients") as earlier:
            earlier.reserve(padded_bytes(sizes), padded_bytes(sizes))[:] = 0xAB
    with pool.lease("gradients") as lease:
        buffer = ChunkBuffer(sizes, InvalidArgument, reserve=lease.reserve)
        position, turn = 0, 0
        while position < len(stream):
            step = cuts[turn % len(cuts)]
            buffer.write(stream[position:position + step])
            position, turn = position + step, turn + 1
        assert buffer.filled == sum(sizes)
        for index, part in enumerate(parts):
            got = buffer.data[buffer.offsets[index]:buffer.offsets[index] + len(part)]
            np.testing.assert_array_equal(got, part)
            assert not len(part) or buffer.data[buffer.offsets[index]:].ctypes.data % ALIGNMENT == 0
        assert 0 < budget.in_use or sum(sizes) == 0
        del buffer, got
    assert budget.in_use == 0
