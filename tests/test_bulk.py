"""The bulk channels: tensor bytes on a ticketed TCP connection beside gRPC, over real servers on 127.0.0.1.

Exactness against the stream path, TLS and mTLS, tokens, tickets, framing errors, dead clients, idle
connections and the request limits, all on the bulk path; the frame header and the ticket are fuzzed.
"""

import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optserve.client import TLS, Client, IndexedSlices, OptserveError
from optserve.client.client import Optimizer
from optserve.server import bulk as server_bulk
from optserve.v1 import optserve_pb2 as pb
from optserve.v1 import optserve_pb2_grpc as pb_grpc
from optserve.wire.chunks import encode_stream
from optserve.wire.frames import ACK, FRAME, TICKET_BYTES
from tests.conftest import RunningServer, serving, wait_until
from tests.test_security import TOKENS, Pki, pki, token_file  # noqa: F401 (fixtures)

SHAPE = (2, 3)
PARAMS = {"w": np.arange(6, dtype=np.float32).reshape(SHAPE)}
GRADS = {"w": np.ones(SHAPE, np.float32)}


@pytest.fixture
def own_server() -> Iterator[RunningServer]:
    """A server of its own: the test counts its channels and handshakes."""
    yield from serving()


def received(server: RunningServer, name: str, transport: str) -> float:
    return server.registry.metrics.registry.get_sample_value(
        "optserve_received_bytes_total", {"optimizer": name, "transport": transport}) or 0.0


def sent(server: RunningServer, name: str, transport: str) -> float:
    return server.registry.metrics.registry.get_sample_value(
        "optserve_sent_bytes_total", {"optimizer": name, "transport": transport}) or 0.0


def bulk_port(server: RunningServer) -> int:
    return server.built.bulk.port


def closed_without_ack(sock: socket.socket, timeout: float = 30.0) -> bool:
    """Whether the server closes `sock` having sent nothing (no ACK: no channel bound)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def open_ticket(address: str, token: str | None = None) -> pb.BulkChannel:
    with grpc.insecure_channel(address) as channel:
        metadata = None if token is None else [("authorization", f"Bearer {token}")]
        return pb_grpc.OptimizerServiceStub(channel).OpenBulkChannel(pb.OpenBulkChannelRequest(), timeout=10,
                                                                     metadata=metadata)


def raw_push(client: Client, name: str, frame: bytes | None = None, payload: bytes | None = None,
             transfer: int | None = None) -> grpc.Future:
    """A push of GRADS whose header names a channel of `client`, with `frame` and `payload` sent as given."""
    connection = client._bulk.checkout(10)
    number = connection.next_transfer()
    header = pb.PushHeader(optimizer=name, gradients=[pb.GradientSpec(name="w", dtype=pb.DATA_TYPE_FLOAT32,
                                                                      shape=SHAPE)],
                           bulk=pb.BulkTransfer(channel=connection.channel,
                                                transfer=number if transfer is None else transfer))
    call = client._push.future(encode_stream(header, ()), timeout=30)
    data = GRADS["w"].tobytes()
    try:
        connection.sock.sendall((FRAME.pack(number, len(data)) if frame is None else frame)
                                + (data if payload is None else payload))
    except OSError:
        pass
    call.connection = connection
    return call


# --- the same numbers as the stream -------------------------------------------------------------------------


def test_push_and_pull_trajectories_are_bit_identical_to_the_stream(server: RunningServer, name: str):
    rng = np.random.default_rng(11)
    params = {"dense": rng.standard_normal((300, 70)).astype(np.float32),
              "bias": rng.standard_normal(5).astype(np.float32),
              "emb": rng.standard_normal((50, 4)).astype(np.float32),
              "empty": np.zeros((0, 3), np.float32)}
    config = {"learning_rate": 0.01, "amsgrad": True, "use_ema": True, "weight_decay": 0.004}
    trajectories = {}
    for transport in ("network", "grpc"):
        with Client(server.address, transport=transport) as client:
            opt = client.create_optimizer(f"{name}-{transport}", params, config)
            steps, weights = [], None
            step_rng = np.random.default_rng(5)
            for step in range(6):
                grads = {"dense": step_rng.standard_normal((300, 70)).astype(np.float32),
                         "bias": step_rng.standard_normal(5).astype(np.float32),
                         "emb": IndexedSlices(np.array([3, 3, 49]), step_rng.standard_normal((3, 4))),
                         "empty": np.zeros((0, 3), np.float32)}
                opt.push(grads, worker_id="w", seq=step, wire_dtype=(None, "float16", "bfloat16")[step % 3])
                weights = opt.pull(into=weights)
                steps.append({key: array.copy() for key, array in weights.items()})
            steps += [opt.pull(ema=True), opt.pull_slot("m"), opt.pull_slot("vhat"), opt.pull(names=["bias"])]
            trajectories[transport] = steps
            if transport == "network":
                assert client._bulk.opened == 1  # one caller, one channel, reused for every transfer
    for bulk_step, stream_step in zip(trajectories["network"], trajectories["grpc"], strict=True):
        assert list(bulk_step) == list(stream_step)
        for key in bulk_step:
            assert bulk_step[key].tobytes() == stream_step[key].tobytes(), key
    assert received(server, f"{name}-network", "bulk") > 0 and received(server, f"{name}-grpc", "bulk") == 0
    assert sent(server, f"{name}-network", "bulk") > 0 and sent(server, f"{name}-network", "grpc") == 0


def test_exactly_once_holds_on_the_bulk_path(client: Client, name: str):
    opt = client.create_optimizer(name, PARAMS, {"learning_rate": 0.5})
    assert not opt.push(GRADS, worker_id="w", seq=7).duplicate
    again = opt.push(GRADS, worker_id="w", seq=7)
    assert again.duplicate and again == 1 and opt.info().version == 1


def test_concurrent_callers_get_a_channel_each(server: RunningServer, name: str):
    with Client(server.address, transport="network") as client:
        opt = client.create_optimizer(name, {"w": np.zeros(100_000, np.float32)}, {"learning_rate": 0.1})
        grads = {"w": np.ones(100_000, np.float32)}
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(5):
                    opt.push(grads)
                    assert opt.pull()["w"].shape == (100_000,)
            except BaseException as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors and opt.info().version == 20
        assert 1 <= client._bulk.opened <= 4
    assert received(server, name, "bulk") == 20 * 400_000


def test_a_server_without_bulk_channels_refuses_them_and_clients_use_the_stream(name: str):
    for running in serving(bulk_port=-1):
        with pytest.raises(grpc.RpcError) as refused:
            open_ticket(running.address)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--bulk-port -1" in refused.value.details()
        with Client(running.address, transport="network") as client:
            opt = client.create_optimizer(name, PARAMS, {"learning_rate": 0.5})
            opt.push(GRADS)
            assert opt.pull().version == 1 and client._bulk.disabled
        assert received(running, name, "bulk") == 0 and received(running, name, "grpc") == 2 * GRADS["w"].nbytes


def test_an_unreachable_bulk_listener_costs_one_short_try_then_the_stream_carries_the_bytes(
        server: RunningServer, name: str):
    """As behind a container's unpublished port: the listener the server announces cannot be reached."""
    with socket.socket() as unused:  # a port on this host that nothing listens on
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    with Client(server.address, transport="network") as client:
        opened = []

        def announce_a_dead_port(timeout: float) -> pb.BulkChannel:
            reply = open_ticket(server.address)
            reply.port = closed_port
            opened.append(reply)
            return reply

        client._bulk._open_channel = announce_a_dead_port
        opt = client.create_optimizer(name, PARAMS, {"learning_rate": 0.5})
        for _ in range(3):
            opt.push(GRADS)
        assert opt.pull().version == 3
        assert len(opened) == 1, "after the failed connect, calls must go in the stream without trying again"
    assert received(server, name, "bulk") == 0 and received(server, name, "grpc") == 4 * GRADS["w"].nbytes


def test_the_grpc_transport_opens_no_channel(server: RunningServer, name: str):
    with Client(server.address, transport="grpc") as client:
        opt = client.create_optimizer(name, PARAMS)
        opt.push(GRADS)
        opt.pull()
        assert client._bulk is None
    assert received(server, name, "bulk") == 0


def test_a_channel_the_server_closed_while_idle_is_reopened_transparently(server: RunningServer, name: str,
                                                                          monkeypatch: pytest.MonkeyPatch):
    with Client(server.address, transport="network") as client:
        opt = client.create_optimizer(name, PARAMS, {"learning_rate": 0.5})
        opt.push(GRADS)
        monkeypatch.setattr(server_bulk, "IDLE_SECONDS", 0.2)
        wait_until(lambda: server.built.bulk.open_channels() == 0, "the idle channel to be closed")
        monkeypatch.setattr(server_bulk, "IDLE_SECONDS", 300.0)
        opt.push(GRADS)
        assert opt.pull().version == 2 and client._bulk.opened == 2


# --- TLS, mTLS and tokens -------------------------------------------------------------------------------------


def test_a_tls_server_serves_its_bulk_channels_over_tls(pki: Pki, name: str):  # noqa: F811
    for running in serving(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)):
        with Client(running.address, tls=TLS(ca=pki.ca), transport="network") as client:
            opt = client.create_optimizer(name, PARAMS, {"learning_rate": 0.5})
            opt.push(GRADS)
            opt.push(GRADS)
            assert opt.pull().version == 2
            assert isinstance(client._bulk._idle[0].sock, ssl.SSLSocket) and client._bulk.opened == 1
            assert running.registry.metrics.registry.get_sample_value("optserve_bulk_channels") == 1
        assert received(running, name, "bulk") == 2 * GRADS["w"].nbytes
        ticket = open_ticket_tls(running.address, pki, cert=False)  # a valid ticket, sent in plaintext
        with socket.create_connection(("127.0.0.1", bulk_port(running))) as raw:
            raw.sendall(ticket.ticket)
            assert closed_without_ack(raw)


def open_ticket_tls(address: str, pki: Pki, cert: bool) -> pb.BulkChannel:  # noqa: F811
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes() if cert else None,
        pki.client_cert.read_bytes() if cert else None)
    with grpc.secure_channel(address, credentials) as channel:
        return pb_grpc.OptimizerServiceStub(channel).OpenBulkChannel(pb.OpenBulkChannelRequest(), timeout=10)


def test_mtls_bulk_channels_need_a_client_certificate(pki: Pki, name: str):  # noqa: F811
    options = dict(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca))
    for running in serving(**options):
        tls = TLS(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        with Client(running.address, tls=tls, transport="network") as client:
            opt = client.create_optimizer(name, PARAMS, {"learning_rate": 0.5})
            opt.push(GRADS)
            assert opt.pull().version == 1 and isinstance(client._bulk._idle[0].sock, ssl.SSLSocket)
        ticket = open_ticket_tls(running.address, pki, cert=True)
        wait_until(lambda: running.built.bulk.open_channels() == 0, "the closed client's channel to be dropped")
        for client_cert in (None, (pki.stranger_cert, pki.stranger_key)):  # no certificate, another CA's
            context = ssl.create_default_context(cafile=str(pki.ca))
            if client_cert is not None:
                context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
            with socket.create_connection(("127.0.0.1", bulk_port(running)), timeout=10) as raw:
                try:
                    with context.wrap_socket(raw, server_hostname="localhost") as tls_sock:
                        tls_sock.sendall(ticket.ticket)
                        assert tls_sock.recv(1) == b""  # TLS 1.3: the refusal comes after the handshake
                except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                    pass
        assert running.built.bulk.open_channels() == 0  # the ticket bound nothing


def test_a_caller_without_the_token_moves_no_byte(token_file, name: str):  # noqa: F811
    for running in serving(token_file=str(token_file)):
        with Client(running.address, token=TOKENS[0], transport="network") as client:
            opt = client.create_optimizer(name, PARAMS, {"learning_rate": 0.5})
            opt.push(GRADS)
        wait_until(lambda: running.built.bulk.open_channels() == 0, "the closed client's channel to be dropped")
        before = (opt_version(running, name), received(running, name, "bulk"), received(running, name, "grpc"))
        for token in (None, "not-a-token"):
            with pytest.raises(grpc.RpcError) as refused:
                open_ticket(running.address, token)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with socket.create_connection(("127.0.0.1", bulk_port(running))) as raw:  # a guessed ticket, then bytes
            raw.sendall(os.urandom(TICKET_BYTES))
            try:
                raw.sendall(FRAME.pack(0, 24) + GRADS["w"].tobytes())
            except OSError:
                pass
            assert closed_without_ack(raw)
        with grpc.insecure_channel(running.address) as channel:  # a push naming a guessed channel, no token
            header = pb.PushHeader(optimizer=name, gradients=[pb.GradientSpec(
                name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=SHAPE)], bulk=pb.BulkTransfer(channel="0" * 32))
            push = channel.stream_unary("/optserve.v1.OptimizerService/PushGradients", request_serializer=bytes)
            with pytest.raises(grpc.RpcError) as refused:
                push(encode_stream(header, ()), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (opt_version(running, name), received(running, name, "bulk"), received(running, name, "grpc")) == before
        assert running.built.bulk.open_channels() == 0


def opt_version(running: RunningServer, name: str) -> int:
    return running.registry.get(name).info().version


# --- tickets ------------------------------------------------------------------------------------------------


def test_a_ticket_binds_one_connection_only(own_server: RunningServer):
    ticket = open_ticket(own_server.address)
    port = bulk_port(own_server)
    with socket.create_connection(("127.0.0.1", port)) as first, \
            socket.create_connection(("127.0.0.1", port)) as second:
        first.sendall(ticket.ticket)
        first.settimeout(10)
        assert first.recv(1) == ACK
        second.sendall(ticket.ticket)
        assert closed_without_ack(second)
    assert own_server.built.bulk.open_channels() <= 1


def test_an_expired_ticket_binds_nothing(own_server: RunningServer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(server_bulk, "TICKET_SECONDS", 0.05)
    ticket = open_ticket(own_server.address)
    wait_until(lambda: not own_server.built.bulk._tickets, "the ticket to expire")
    with socket.create_connection(("127.0.0.1", bulk_port(own_server))) as raw:
        raw.sendall(ticket.ticket)
        assert closed_without_ack(raw)
    assert own_server.built.bulk.open_channels() == 0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2 * TICKET_BYTES))
def test_fuzzed_tickets_bind_nothing(own_server: RunningServer, ticket: bytes):
    open_ticket(own_server.address)  # a real ticket is outstanding meanwhile
    with socket.create_connection(("127.0.0.1", bulk_port(own_server))) as raw:
        raw.sendall(ticket)
        raw.shutdown(socket.SHUT_WR)
        assert closed_without_ack(raw)
    assert own_server.built.bulk.open_channels() == 0


def test_idle_raw_connections_are_bounded_then_closed(own_server: RunningServer, name: str,
                                                      monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(server_bulk, "HANDSHAKE_SECONDS", 1.0)
    idle = [socket.create_connection(("127.0.0.1", bulk_port(own_server))) for _ in range(200)]
    try:
        assert own_server.built.bulk.handshakes() <= server_bulk.MAX_HANDSHAKES_PER_PEER
        with Client(own_server.address, transport="network") as client:  # still served (perhaps by the stream)
            opt = client.create_optimizer(name, PARAMS, {"learning_rate": 0.5})
            opt.push(GRADS)
            assert opt.pull().version == 1
        for sock in idle:
            assert closed_without_ack(sock)
        wait_until(lambda: own_server.built.bulk.handshakes() == 0, "the handshakes to end")
        with Client(own_server.address, transport="network") as client:  # and bulk channels open again
            client.optimizer(name).push(GRADS)
        assert received(own_server, name, "bulk") >= GRADS["w"].nbytes
    finally:
        for sock in idle:
            sock.close()


# --- framing errors, dead clients, limits -------------------------------------------------------------------


@pytest.mark.parametrize("frame, payload, transfer, message", [
    (FRAME.pack(0, 20), None, None, "the frame carries 20 bytes, the header declares 24"),
    (FRAME.pack(0, 28), None, None, "the frame carries 28 bytes"),
    (FRAME.pack(5, 24), None, None, "the frame on the channel is transfer 5, the header names 0"),
    (None, b"\x00" * 10, None, "the connection ended after 10 of the 24 bytes"),
    (b"\x00" * 7, b"", None, "the connection ended after 7 of the frame's 16 header bytes"),
    (None, None, -1, "bulk.transfer: must be above the channel's last transfer -1"),
])
def test_a_bad_frame_is_refused_closes_the_channel_and_changes_nothing(
        server: RunningServer, name: str, frame, payload, transfer, message):
    with Client(server.address, transport="network") as client:
        opt = client.create_optimizer(name, PARAMS, {"learning_rate": 0.5})
        call = raw_push(client, name, frame, payload, transfer)
        if payload is not None and len(payload) < 24 or frame is not None and len(frame) < FRAME.size:
            call.connection.sock.shutdown(socket.SHUT_WR)  # the client stops short
        with pytest.raises(grpc.RpcError) as refused:
            call.result()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in refused.value.details()
        assert closed_without_ack(call.connection.sock)
        assert opt.info().version == 0 and received(server, name, "bulk") == 0
        opt.push(GRADS)  # the client opens another channel; the server serves on
        assert opt.pull().version == 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=st.binary(min_size=FRAME.size, max_size=FRAME.size))
def test_fuzzed_frame_headers_apply_only_the_right_one(server: RunningServer, client: Client, frame: bytes):
    name = "fuzzed-frame-headers"
    if name not in [info.name for info in client.list_optimizers()]:
        client.create_optimizer(name, PARAMS, {"learning_rate": 0.5})
    before = opt_version(server, name)
    call = raw_push(client, name, frame)
    number, _ = FRAME.unpack(frame)
    right = frame == FRAME.pack(call.connection._next - 1, 24)
    try:
        call.result()
        assert right and opt_version(server, name) == before + 1
    except grpc.RpcError as err:
        assert not right and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert opt_version(server, name) == before
    call.connection.close()


DYING_CLIENT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from optserve.client import Client
    from optserve.v1 import optserve_pb2 as pb
    from optserve.wire.chunks import encode_stream
    from optserve.wire.frames import FRAME
    client = Client(sys.argv[1], transport="network")
    connection = client._bulk.checkout(30)
    n = int(sys.argv[3])
    header = pb.PushHeader(optimizer=sys.argv[2], gradients=[pb.GradientSpec(
        name="w", dtype=pb.DATA_TYPE_FLOAT32, shape=[n])], bulk=pb.BulkTransfer(channel=connection.channel))
    call = client._push.future(encode_stream(header, ()), timeout=120)
    data = np.ones(n, np.float32).tobytes()
    connection.sock.sendall(FRAME.pack(0, len(data)) + data[:len(data) // 2])
    print("half", flush=True)
    time.sleep(120)
""")


def test_a_client_killed_mid_transfer_leaves_the_server_consistent(server: RunningServer, client: Client, name: str):
    n = 1 << 20  # 4 MiB
    opt = client.create_optimizer(name, {"w": np.zeros(n, np.float32)}, {"learning_rate": 0.5})
    before = client.optimizer(name).pull()
    child = subprocess.Popen([sys.executable, "-c", DYING_CLIENT, server.address, name, str(n)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "half"
        wait_until(lambda: server.built.bulk.open_channels() >= 1, "the dying client's channel")
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        child.kill()
        child.wait(30)
    wait_until(lambda: refused_pushes(server, name) == 1, "the half push to be refused")
    after = opt.pull()
    assert after.version == 0 and after["w"].tobytes() == before["w"].tobytes()
    assert received(server, name, "bulk") == 0
    with Client(server.address, transport="network") as other:
        other.optimizer(name).push({"w": np.ones(n, np.float32)})
        assert other.optimizer(name).pull().version == 1
    assert received(server, name, "bulk") == 4 * n


def refused_pushes(running: RunningServer, name: str) -> float:
    return running.registry.metrics.registry.get_sample_value(
        "optserve_pushes_refused_total", {"optimizer": name, "reason": "invalid_argument"}) or 0.0


def test_a_big_push_refused_before_its_bytes_are_read_gets_its_status(client: Client, name: str):
    big = {"w": np.ones(4 << 20, np.float32)}  # 16 MiB: more than the sockets buffer, so the send must be stopped
    with pytest.raises(OptserveError) as refused:  # no such optimizer: NOT_FOUND before any byte is read
        Optimizer(client, name).push(big)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND and name in refused.value.details()
    opt = client.create_optimizer(name, {"w": np.zeros(4 << 20, np.float32)})
    with pytest.raises(OptserveError) as refused:  # a wrong shape: refused on the header alone
        opt.push({"w": np.ones((4 << 20) + 1, np.float32)})
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shape" in refused.value.details()
    assert opt.push(big) == 1


@pytest.fixture(scope="module")
def limited_server() -> Iterator[RunningServer]:
    yield from serving(max_request_bytes=1 << 20, max_inflight_bytes=512 << 10)


@pytest.mark.parametrize("rows, limit", [
    (1 << 20, "limit of 1048576 per request"),  # 8 MiB in one push: over max_request_bytes
    (100_000, "max_inflight_bytes"),  # 800 KB: within max_request_bytes, over the in-flight budget
])
def test_the_limits_hold_on_the_bulk_path(limited_server: RunningServer, name: str, rows: int, limit: str):
    with Client(limited_server.address, transport="network") as client:
        opt = client.create_optimizer(name, {"e": np.zeros((10, 1), np.float32)}, {"learning_rate": 0.5})
        grads = {"e": IndexedSlices(np.zeros(rows, np.int32), np.ones((rows, 1), np.float32))}  # sparse: any size
        with pytest.raises(OptserveError) as refused:
            opt.push(grads)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and limit in refused.value.details()
        assert opt.info().version == 0
        opt.push({"e": np.ones((10, 1), np.float32)})
        assert opt.pull().version == 1 and received(limited_server, name, "bulk") == 40
