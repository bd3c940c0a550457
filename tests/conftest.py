"""Shared fixtures: a real optserve gRPC server on 127.0.0.1 and clients of it."""

import re
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from optserve.client import Client
from optserve.server.app import create_server
from optserve.server.options import ServerOptions
from optserve.server.registry import Registry


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--containers", action="store_true",
                     help="run tests/test_containers.py: build and run the images with podman (root; "
                          "`make test-containers`)")
    parser.addoption("--images", metavar="SERVER,WORKER",
                     help="with --containers: test these built images (kept) instead of building docker/ anew")


class RunningServer:
    """An in-process server bound to 127.0.0.1 on a free port; serving unless `restore` is False."""

    def __init__(self, options: ServerOptions, interceptors=(), restore: bool = True):
        self.built = create_server(options, interceptors)
        self.registry = self.built.registry
        self.address = f"127.0.0.1:{self.built.port}"
        self.built.server.start()
        if restore:
            self.built.open()

    def stop(self) -> None:
        self.built.shutdown(grace=None)


def serving(**options) -> Iterator[RunningServer]:
    """A RunningServer on 127.0.0.1 with these ServerOptions, stopped when the generator closes."""
    running = RunningServer(ServerOptions(host="127.0.0.1", port=0, **options))
    try:
        yield running
    finally:
        running.stop()



def run_threads(target: Callable[[int], None], count: int, timeout: float = 120.0) -> None:
    """Runs `target(index)` in `count` threads at once and waits for them (each join bounded by `timeout`)."""
    threads = [threading.Thread(target=target, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)


def stepped_weights(client: Client, name: str, params, grads, config=None) -> dict:
    """The weights (copies, by tensor name) after creating `name` from `params` and pushing `grads` once; deleted."""
    opt = client.create_optimizer(name, params, config or {"learning_rate": 0.1})
    try:
        opt.push(grads)
        return {k: v.copy() for k, v in opt.pull().items()}
    finally:
        client.delete_optimizer(name)


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    """Polls `condition` (bounded in time) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """One server for the whole session; tests keep apart by optimizer name."""
    running = RunningServer(ServerOptions(host="127.0.0.1", port=0, max_request_bytes=64 << 20))
    yield running
    running.stop()


@pytest.fixture
def registry(server: RunningServer) -> Registry:
    return server.registry


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.address, timeout=60.0) as connected:
        yield connected


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """An optimizer name unique to the running test."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", request.node.name)[:128]
