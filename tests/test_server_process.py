"""`optserve serve` as a real process: serves, and drains in-flight calls on SIGTERM."""

import io
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.client import Client, OptserveError
from optserve.server.launch import ServerProcess
from optserve.v1 import optserve_pb2 as pb
from optserve.v1 import optserve_pb2_grpc as pb_grpc


def wait_for_line(server: ServerProcess, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in server.lines):
            return
        time.sleep(0.05)
    raise AssertionError(f"server never logged {text!r}:\n{''.join(server.lines)}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_the_push_in_flight_finish_then_exits_cleanly(signum: int) -> None:
    server = ServerProcess(log=io.StringIO())
    try:
        client = Client(server.address, timeout=60.0)
        opt = client.create_optimizer("m", {"w": np.ones(1000, np.float32)}, {"learning_rate": 0.1})
        opt.push({"w": np.ones(1000, np.float32)})  # compiles the step before the timed part

        signalled, started = threading.Event(), threading.Event()

        def slow_push():
            spec = pb.GradientSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=[1000])
            yield pb.PushGradientsRequest(header=pb.PushHeader(optimizer="m", gradients=[spec]))
            yield pb.PushGradientsRequest(chunk=np.ones(500, np.float32).tobytes())
            started.set()  # gRPC has taken the first messages: the call is under way
            signalled.wait(timeout=60)  # the rest arrives only after the signal
            yield pb.PushGradientsRequest(chunk=np.ones(500, np.float32).tobytes())

        stub = pb_grpc.OptimizerServiceStub(client._channel)
        future = stub.PushGradients.future(slow_push(), timeout=60)
        health = health_pb2_grpc.HealthStub(client._channel).Watch(
            health_pb2.HealthCheckRequest(service="optserve.v1.OptimizerService"), timeout=60)
        assert next(health).status == health_pb2.HealthCheckResponse.SERVING
        assert started.wait(timeout=30)
        time.sleep(0.5)  # and has reached the server
        server.process.send_signal(signum)
        wait_for_line(server, "shutting down")
        assert next(health).status == health_pb2.HealthCheckResponse.NOT_SERVING  # draining
        signalled.set()
        assert future.result().version == 2
        assert server.process.wait(timeout=60) == 0
        wait_for_line(server, "stopped")
        with pytest.raises(OptserveError) as caught:
            Client(server.address, timeout=1.0)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        client.close()
    finally:
        server.stop()


def test_serve_help_lists_its_flags(capsys) -> None:
    from optserve.server.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ["--host", "--port", "--max-workers", "--max-request-bytes", "--grace", "--log-level"]:
        assert flag in out
