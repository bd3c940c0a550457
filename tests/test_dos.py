"""Denial of service over real server processes: idle, waiting, dead and unauthenticated calls.

An attacker holds calls open on connections of its own (channels with a local
subchannel pool, so they do not share the test client's connection); the
server must keep answering health checks and authenticated work.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.client import Client
from optserve.wire.chunks import encode_stream
from optserve.server.launch import ServerProcess
from optserve.v1 import optserve_pb2 as pb

TOKEN = "dos-test-token-0123456789"
AUTH = [("authorization", f"Bearer {TOKEN}")]
SERVICE = "/optserve.v1.OptimizerService/"
FAR = 10**9  # a min_version no optimizer reaches
POLL_SECONDS = 30.0  # the longest any condition below is waited for


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dos") / "tokens"
    path.write_text(TOKEN + "\n")
    return path


def own_channel(address: str) -> grpc.Channel:
    """A channel on a connection of its own."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def wait_until(condition: Callable[[], bool], seconds: float = POLL_SECONDS) -> bool:
    """Polls `condition` until it holds or `seconds` pass; says whether it held."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except (OSError, grpc.RpcError):
            pass
        time.sleep(0.1)
    return False


def metrics_port(server: ServerProcess) -> int:
    assert wait_until(lambda: any("metrics on" in line for line in server.lines)), "".join(server.lines)
    (line,) = [line for line in server.lines if "metrics on" in line]
    return int(re.search(r"metrics on https?://[^:]+:(\d+)/metrics", line).group(1))


def held(port: int, budget: str) -> float:
    """The server's count of calls in progress of one budget (optserve_calls_in_progress)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": AUTH[0][1]})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(f'optserve_calls_in_progress{{budget="{budget}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def serving(address: str) -> bool:
    """One health Check with a bounded deadline, on a fresh connection."""
    with own_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def push_and_pull(address: str, name: str) -> None:
    """A legitimate push and pull, each within a bounded deadline."""
    with Client(address, timeout=15, token=TOKEN) as client:
        opt = client.optimizer(name)
        version = opt.push({"w": np.ones(4, np.float32)})
        assert opt.pull().version >= version


class IdleStreams:
    """Request streams that send `first` messages and then nothing, until closed."""

    def __init__(self, call: grpc.StreamUnaryMultiCallable, first: list[bytes], count: int, metadata=()):
        self._release = threading.Event()
        start = getattr(call, "future", call)  # a stream-stream call is its own future
        self.calls = [start(self._requests(first), metadata=list(metadata)) for _ in range(count)]

    def _requests(self, first: list[bytes]) -> Iterator[bytes]:
        yield from first
        self._release.wait(POLL_SECONDS * 4)

    def close(self) -> None:
        for call in self.calls:
            call.cancel()
        self._release.set()


def push_header(name: str) -> bytes:
    header = pb.PushHeader(optimizer=name, gradients=[pb.GradientSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=[4])])
    return next(encode_stream(header, []))


def waiting_pulls(channel: grpc.Channel, name: str, count: int, metadata=()) -> list:
    pull = channel.unary_stream(SERVICE + "PullWeights")
    request = pb.PullWeightsRequest(optimizer=name, min_version=FAR).SerializeToString()
    return [pull(request, metadata=list(metadata)) for _ in range(count)]


@pytest.fixture
def guarded(token_file: Path) -> Iterator[ServerProcess]:
    """A server that requires a token, with metrics, at the server's default limits."""
    with ServerProcess(["--token-file", str(token_file), "--metrics-port", "0"], log=open(os.devnull, "w")) as server:
        with Client(server.address, timeout=60, token=TOKEN) as client:
            client.create_optimizer("target", {"w": np.zeros(4, np.float32)})
        yield server


def test_idle_push_streams_and_waiting_pulls_leave_health_push_and_pull_working(guarded: ServerProcess):
    address, port = guarded.address, metrics_port(guarded)
    push = lambda channel: channel.stream_unary(SERVICE + "PushGradients")  # noqa: E731
    with own_channel(address) as pushers, own_channel(address) as pullers, own_channel(address) as strangers:
        idle = IdleStreams(push(pushers), [push_header("target")], 64, AUTH)
        unauthenticated = IdleStreams(push(strangers), [push_header("target")], 64)
        pulls = waiting_pulls(pullers, "target", 64, AUTH)
        try:
            # every idle call admitted and nothing else in progress (a finished call's slot may be given back late)
            assert wait_until(lambda: held(port, "stream") == 128 and held(port, "waiting") == 64)
            assert serving(address)
            push_and_pull(address, "target")
            for call in unauthenticated.calls:  # refused before their stream is read: they hold no thread
                assert call.exception(timeout=POLL_SECONDS).code() == grpc.StatusCode.UNAUTHENTICATED
            assert not any(call.done() for call in idle.calls)  # the idle ones are still open, not refused
            assert wait_until(lambda: held(port, "stream") == 128 and held(port, "waiting") == 64)
        finally:
            idle.close()
            unauthenticated.close()
            for call in pulls:
                call.cancel()
        assert wait_until(lambda: held(port, "stream") == 0 and held(port, "waiting") == 0)


def test_one_connection_cannot_take_more_than_its_share(guarded: ServerProcess):
    address, port = guarded.address, metrics_port(guarded)
    with own_channel(address) as channel:
        pulls = waiting_pulls(channel, "target", 80, AUTH)
        try:
            assert wait_until(lambda: sum(call.done() for call in pulls) >= 16 and held(port, "waiting") >= 64)
            refused = [call for call in pulls if call.done()]
            assert len(refused) == 16, [call.code() for call in refused]  # 64 per connection
            assert all(call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for call in refused)
            assert "--max-streams-per-connection" in refused[0].details()
            push_and_pull(address, "target")
        finally:
            for call in pulls:
                call.cancel()
        assert wait_until(lambda: held(port, "waiting") == 0)


def test_unauthenticated_reflection_and_health_watch_streams_leave_the_server_working(guarded: ServerProcess):
    address, port = guarded.address, metrics_port(guarded)
    reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    request = health_pb2.HealthCheckRequest(service="").SerializeToString()
    with own_channel(address) as reflectors, own_channel(address) as watchers:
        idle = IdleStreams(reflectors.stream_stream(reflection), [], 64)
        watch = watchers.unary_stream("/grpc.health.v1.Health/Watch")
        watches = [watch(request) for _ in range(1000)]
        try:
            wait_until(lambda: held(port, "reflection") >= 8 and held(port, "watch") >= 16)
            assert serving(address)
            push_and_pull(address, "target")
            assert wait_until(lambda: sum(call.done() for call in idle.calls) >= 64 - 8
                              and sum(call.done() for call in watches) >= 1000 - 16)
            for calls, admitted in ((idle.calls, 8), (watches, 16)):  # the reflection and Watch budgets
                refused = [call for call in calls if call.done()]
                assert len(refused) == len(calls) - admitted
                assert all(call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for call in refused)
        finally:
            idle.close()
            for call in watches:
                call.cancel()
        assert wait_until(lambda: held(port, "reflection") == 0 and held(port, "watch") == 0)


def test_a_stream_that_stops_sending_is_cancelled_after_the_idle_timeout(token_file: Path):
    args = ["--token-file", str(token_file), "--metrics-port", "0", "--stream-idle-timeout", "1"]
    with ServerProcess(args, log=open(os.devnull, "w")) as server, own_channel(server.address) as channel:
        with Client(server.address, timeout=60, token=TOKEN) as client:
            client.create_optimizer("target", {"w": np.zeros(4, np.float32)})
        port = metrics_port(server)
        idle = IdleStreams(channel.stream_unary(SERVICE + "PushGradients"), [push_header("target")], 4, AUTH)
        reflection = IdleStreams(channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"), [], 2)
        try:
            for call in idle.calls:
                assert call.exception(timeout=POLL_SECONDS).code() == grpc.StatusCode.CANCELLED
            for call in reflection.calls:
                assert call.exception(timeout=POLL_SECONDS).code() == grpc.StatusCode.CANCELLED
            assert wait_until(lambda: held(port, "stream") == 0 and held(port, "reflection") == 0)
            waiting = waiting_pulls(channel, "target", 1, AUTH)[0]  # waits for the optimizer, not for its peer
            assert not wait_until(waiting.done, 3)
            waiting.cancel()
        finally:
            idle.close()
            reflection.close()


def test_unary_calls_whose_request_never_comes_are_bounded_and_timed_out(token_file: Path):
    """A unary method called as a stream that sends nothing: gRPC would wait for the request on a pool thread."""
    args = ["--token-file", str(token_file), "--metrics-port", "0", "--stream-idle-timeout", "10"]
    with ServerProcess(args, log=open(os.devnull, "w")) as server:
        with Client(server.address, timeout=60, token=TOKEN) as client:
            client.create_optimizer("target", {"w": np.zeros(4, np.float32)})
        port = metrics_port(server)
        with own_channel(server.address) as a, own_channel(server.address) as b, own_channel(server.address) as c:
            gets = IdleStreams(a.stream_unary(SERVICE + "GetOptimizer"), [], 64, AUTH)
            checks = IdleStreams(b.stream_unary("/grpc.health.v1.Health/Check"), [], 64)
            strangers = IdleStreams(c.stream_unary(SERVICE + "GetOptimizer"), [], 64)
            try:
                wait_until(lambda: sum(call.done() for call in gets.calls + checks.calls) >= 2 * (64 - 8))
                assert serving(server.address)
                push_and_pull(server.address, "target")
                for calls in (gets.calls, checks.calls):  # 8 per connection may wait for their request
                    refused = [call for call in calls if call.done()]
                    assert len(refused) == 64 - 8
                    assert all(call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for call in refused)
                for call in strangers.calls:  # refused for their token before anything is read
                    assert call.exception(timeout=POLL_SECONDS).code() == grpc.StatusCode.UNAUTHENTICATED
                for call in gets.calls + checks.calls:  # the idle timeout ends the ones that wait
                    assert call.exception(timeout=POLL_SECONDS).code() in (
                        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)
                assert wait_until(lambda: held(port, "reading") == 0)
            finally:
                for idle in (gets, checks, strangers):
                    idle.close()


DEAD_CLIENT = """
import sys, time, grpc
from optserve.v1 import optserve_pb2 as pb
from optserve.wire.chunks import encode_stream
address, token = sys.argv[1], sys.argv[2]
auth = [("authorization", "Bearer " + token)]
channel = grpc.insecure_channel(address)
pull = channel.unary_stream("/optserve.v1.OptimizerService/PullWeights")
request = pb.PullWeightsRequest(optimizer="target", min_version=10**9).SerializeToString()
pulls = [pull(request, metadata=auth) for _ in range(64)]  # no deadline
push = channel.stream_unary("/optserve.v1.OptimizerService/PushGradients")
def sync_push(worker):
    header = pb.PushHeader(optimizer="round", worker_id=worker, base_version=0,
                           gradients=[pb.GradientSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=[4])])
    return list(encode_stream(header, [b"\\0" * 16]))
pushes = [push.future(iter(sync_push(f"w{i}")), metadata=auth) for i in range(8)]
print("started", flush=True)
time.sleep(600)
"""


def test_a_killed_clients_waiting_calls_are_released(guarded: ServerProcess, tmp_path: Path):
    address, port = guarded.address, metrics_port(guarded)
    with Client(address, timeout=60, token=TOKEN) as client:
        client.create_optimizer("round", {"w": np.zeros(4, np.float32)}, mode="sync", num_workers=100,
                                sync_timeout=3600)
    script = tmp_path / "dead_client.py"
    script.write_text(DEAD_CLIENT)
    child = subprocess.Popen([sys.executable, str(script), address, TOKEN], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "started"
        wait_until(lambda: held(port, "waiting") >= 72)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=POLL_SECONDS)
        assert wait_until(lambda: held(port, "waiting") == 0 and held(port, "stream") == 0)
        push_and_pull(address, "target")
        with Client(address, timeout=15, token=TOKEN) as client:
            assert client.optimizer("round").info().pending_gradients == 8  # by design, the round keeps them
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("flags, message", [
    (["--max-workers", "64"], "--max-workers 64: must be at least --max-streams (256)"),
    (["--max-waiting-calls", "300"], "--max-waiting-calls 300: waiting calls are streams"),
    (["--stream-idle-timeout", "0"], "--stream-idle-timeout 0.0: must be > 0"),
    (["--max-streams-per-connection", "0"], "--max-streams-per-connection 0: must be at least 1"),
])
def test_limits_that_contradict_each_other_stop_the_server_from_starting(flags: list[str], message: str):
    run = subprocess.run([sys.executable, "-m", "optserve.server.cli", "serve", "--port", "0", *flags],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and message in run.stderr, run.stderr
