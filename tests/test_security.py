"""TLS, mTLS, bearer tokens and the loopback rule, over real servers on 127.0.0.1.

The certificates are made here: a CA, a server certificate for localhost and
127.0.0.1, a client certificate, and a second CA that nobody trusts.
"""

import datetime
import ipaddress
import logging
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.client import TLS, Client, OptserveError
from optserve.server.app import create_server
from optserve.server.launch import ServerProcess
from optserve.server.options import ServerOptions
from optserve.server.security import SecurityConfigError, TokenInterceptor, is_loopback, load_tokens
from tests.conftest import RunningServer, serving

TOKENS = ("first-token-0123456789", "second-token-abcdefghij")
PARAMS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
GRADS = {"w": np.ones((2, 3), np.float32)}
FAIL_TIMEOUT = 1.0  # seconds a client that cannot connect waits before UNAVAILABLE


# --- certificates ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA the servers and clients trust
    server_cert: Path  # for DNS:localhost and IP:127.0.0.1, signed by ca
    server_key: Path
    client_cert: Path  # signed by ca
    client_key: Path
    stranger_cert: Path  # a client certificate signed by another CA
    stranger_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, usage=None, sans=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, stem: str, cert: x509.Certificate, key=None) -> tuple[Path, Path | None]:
    cert_path = directory / f"{stem}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return cert_path, None
    key_path = directory / f"{stem}.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    keys = {role: ec.generate_private_key(ec.SECP256R1()) for role in ("ca", "server", "client", "other", "stranger")}
    ca = _issue("optserve test CA", keys["ca"], "optserve test CA", keys["ca"], ca=True)
    other = _issue("another CA", keys["other"], "another CA", keys["other"], ca=True)
    server = _issue("localhost", keys["server"], "optserve test CA", keys["ca"], usage=ExtendedKeyUsageOID.SERVER_AUTH,
                    sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _issue("worker", keys["client"], "optserve test CA", keys["ca"], usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    stranger = _issue("stranger", keys["stranger"], "another CA", keys["other"], usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_path, _ = _write(directory, "ca", ca)
    _write(directory, "other-ca", other)
    server_cert, server_key = _write(directory, "server", server, keys["server"])
    client_cert, client_key = _write(directory, "client", client, keys["client"])
    stranger_cert, stranger_key = _write(directory, "stranger", stranger, keys["stranger"])
    return Pki(ca_path, server_cert, server_key, client_cert, client_key, stranger_cert, stranger_key)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# workers\n\n{TOKENS[0]}\n   \n# the evaluator\n  {TOKENS[1]}  \n")
    return path


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[RunningServer]:
    yield from serving(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[RunningServer]:
    yield from serving(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca))


@pytest.fixture(scope="module")
def token_server(token_file: Path) -> Iterator[RunningServer]:
    """Plaintext on loopback with two accepted tokens: the client sends them through its interceptor."""
    yield from serving(token_file=str(token_file))


@pytest.fixture(scope="module")
def tls_token_server(pki: Pki, token_file: Path) -> Iterator[RunningServer]:
    """TLS with tokens: the client sends them as call credentials."""
    yield from serving(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), token_file=str(token_file))


def round_trip(client: Client, name: str) -> None:
    """Create, push, pull and delete one optimizer: every kind of RPC the client makes."""
    opt = client.create_optimizer(name, PARAMS, {"learning_rate": 0.5})
    assert opt.push(GRADS) == 1
    weights = opt.pull()
    assert weights.version == 1
    np.testing.assert_allclose(weights["w"], PARAMS["w"] - 0.5, rtol=1e-5)
    assert name in [info.name for info in client.list_optimizers()]
    client.delete_optimizer(name)


# --- TLS and mTLS ---------------------------------------------------------------------------------------------


def test_tls_client_with_the_ca_creates_pushes_and_pulls(tls_server: RunningServer, pki: Pki, name: str):
    with Client(tls_server.address, timeout=30, tls=str(pki.ca)) as client:
        round_trip(client, name)


def test_tls_server_name_override_reaches_a_certificate_for_localhost(tls_server: RunningServer, pki: Pki, name: str):
    with Client(tls_server.address, timeout=30, tls=TLS(ca=pki.ca, server_name="localhost")) as client:
        round_trip(client, name)


@pytest.mark.parametrize("tls", [True, None], ids=["system-roots", "plaintext"])
def test_tls_server_refuses_a_client_without_its_ca(tls_server: RunningServer, tls):
    with pytest.raises(OptserveError) as caught:
        Client(tls_server.address, timeout=FAIL_TIMEOUT, tls=tls)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_server_name_must_match_the_certificate(tls_server: RunningServer, pki: Pki):
    with pytest.raises(OptserveError) as caught:
        Client(tls_server.address, timeout=FAIL_TIMEOUT, tls=TLS(ca=pki.ca, server_name="optserve.example.com"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_client_without_a_certificate(mtls_server: RunningServer, pki: Pki):
    with pytest.raises(OptserveError) as caught:
        with Client(mtls_server.address, timeout=FAIL_TIMEOUT, tls=TLS(ca=pki.ca)) as client:
            client.list_optimizers()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_certificate_from_another_ca(mtls_server: RunningServer, pki: Pki):
    with pytest.raises(OptserveError) as caught:
        with Client(mtls_server.address, timeout=FAIL_TIMEOUT,
                    tls=TLS(ca=pki.ca, cert=pki.stranger_cert, key=pki.stranger_key)) as client:
            client.list_optimizers()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_accepts_a_client_certificate_signed_by_the_client_ca(mtls_server: RunningServer, pki: Pki, name: str):
    tls = TLS(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    with Client(mtls_server.address, timeout=30, tls=tls) as client:
        round_trip(client, name)


def test_tls_client_certificate_needs_its_key(pki: Pki):
    with pytest.raises(ValueError, match="key"):
        Client("127.0.0.1:1", timeout=FAIL_TIMEOUT, tls=TLS(ca=pki.ca, cert=pki.client_cert))


# --- bearer tokens --------------------------------------------------------------------------------------------

# Every kind of RPC: client streaming (create, push), server streaming (pull), unary (the rest).
CALLS: dict[str, Callable[[Client, str], object]] = {
    "create (stream-unary)": lambda client, name: client.create_optimizer(name + "-new", PARAMS),
    "push (stream-unary)": lambda client, name: client.optimizer_handle(name).push(GRADS),
    "pull (unary-stream)": lambda client, name: client.optimizer_handle(name).pull(),
    "pull_slot (unary-stream)": lambda client, name: client.optimizer_handle(name).pull_slot("m"),
    "info (unary)": lambda client, name: client.optimizer_handle(name).info(),
    "optimizer (unary)": lambda client, name: client.optimizer(name),
    "list (unary)": lambda client, name: client.list_optimizers(),
    "finalize (unary)": lambda client, name: client.optimizer_handle(name).finalize(),
    "save (unary)": lambda client, name: client.optimizer_handle(name).save(),
    "delete (unary)": lambda client, name: client.delete_optimizer(name),
}


class _Handles(Client):
    """A Client that makes handles without a GetOptimizer call, so each lambda above makes exactly one RPC."""

    def optimizer_handle(self, name: str):
        from optserve.client import Optimizer

        return Optimizer(self, name)


@pytest.fixture(params=["plaintext-loopback", "tls"])
def guarded(request: pytest.FixtureRequest, pki: Pki) -> tuple[RunningServer, dict]:
    """A server that requires tokens, and the Client keyword arguments that reach it."""
    if request.param == "tls":
        return request.getfixturevalue("tls_token_server"), {"tls": TLS(ca=pki.ca)}
    return request.getfixturevalue("token_server"), {}


@pytest.mark.parametrize("token", [None, "wrong-token", TOKENS[0] + "x", TOKENS[0][:-1]],
                         ids=["missing", "wrong", "longer", "prefix"])
@pytest.mark.parametrize("call", list(CALLS))
def test_calls_without_an_accepted_token_are_unauthenticated(guarded, token: str | None, call: str, name: str):
    server, kwargs = guarded
    with _Handles(server.address, timeout=30, token=TOKENS[0], **kwargs) as owner:
        owner.create_optimizer(name, PARAMS)
    try:
        with _Handles(server.address, timeout=30, token=token, **kwargs) as client:  # health needs no token
            with pytest.raises(OptserveError) as caught:
                CALLS[call](client, name)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "token" in caught.value.details()
        if token is not None:
            assert token not in caught.value.details()
        assert server.registry.get(name).info().iterations == 0  # nothing reached the service
    finally:
        with Client(server.address, timeout=30, token=TOKENS[1], **kwargs) as owner:
            owner.delete_optimizer(name)


@pytest.mark.parametrize("token", TOKENS, ids=["first", "second"])
def test_every_token_in_the_file_is_accepted(guarded, token: str, name: str):
    server, kwargs = guarded
    with Client(server.address, timeout=30, token=token, **kwargs) as client:
        round_trip(client, name)


def test_health_and_reflection_need_no_token(token_server: RunningServer):
    with grpc.insecure_channel(token_server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for method in ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                       "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"):
            try:  # passed on to the server: answered, or UNIMPLEMENTED where reflection is not registered
                list(channel.stream_stream(method)(iter([b""]), timeout=10))
            except grpc.RpcError as err:
                assert err.code() != grpc.StatusCode.UNAUTHENTICATED, method


def test_unknown_methods_without_a_token_are_unauthenticated(token_server: RunningServer):
    with grpc.insecure_channel(token_server.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/optserve.v1.OptimizerService/NoSuchMethod")(b"", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_token_must_come_as_bearer(token_server: RunningServer):
    with grpc.insecure_channel(token_server.address) as channel:
        list_call = channel.unary_unary("/optserve.v1.OptimizerService/ListOptimizers")
        with pytest.raises(grpc.RpcError) as caught:
            list_call(b"", metadata=[("authorization", f"Basic {TOKENS[0]}")], timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert list_call(b"", metadata=[("authorization", f"bearer {TOKENS[1]}")], timeout=10) == b""


def test_token_check_compares_with_every_token():
    interceptor = TokenInterceptor([t.encode() for t in TOKENS])
    for token, expected in [(TOKENS[0], None), (TOKENS[1], None), ("nope", "invalid bearer token")]:
        assert interceptor._check([("authorization", f"Bearer {token}")]) == expected
    assert interceptor._check([]) == "missing bearer token"


# --- starting up: files, flags and the loopback rule ----------------------------------------------------------


def test_token_file_skips_blank_lines_and_comments(token_file: Path):
    assert load_tokens(str(token_file)) == tuple(t.encode() for t in TOKENS)


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n   \n"], ids=["empty", "blank", "comments"])
def test_a_token_file_without_tokens_is_refused(tmp_path: Path, content: str):
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(SecurityConfigError, match=r"--token-file .*holds no token"):
        create_server(ServerOptions(host="127.0.0.1", port=0, token_file=str(path)))


def test_a_missing_token_file_is_refused(tmp_path: Path):
    with pytest.raises(SecurityConfigError, match="--token-file"):
        create_server(ServerOptions(host="127.0.0.1", port=0, token_file=str(tmp_path / "absent")))


def test_plaintext_on_a_non_loopback_host_needs_insecure():
    with pytest.raises(SecurityConfigError) as caught:
        create_server(ServerOptions(host="0.0.0.0", port=0))
    assert "--insecure" in str(caught.value) and "--tls-cert" in str(caught.value)


@pytest.mark.parametrize("options, message", [
    ({"tls_cert": "server.crt"}, "--tls-cert and --tls-key"),
    ({"tls_key": "server.key"}, "--tls-cert and --tls-key"),
    ({"tls_client_ca": "ca.crt"}, "--tls-client-ca needs --tls-cert"),
    ({"tls_cert": "/nonexistent/server.crt", "tls_key": "/nonexistent/server.key"}, "cannot read"),
])
def test_inconsistent_tls_flags_are_refused(options: dict, message: str):
    with pytest.raises(SecurityConfigError, match=message):
        create_server(ServerOptions(host="127.0.0.1", port=0, **options))


@pytest.mark.parametrize("options, description", [
    ({"host": "127.0.0.1"}, "plaintext (loopback only)"),
    ({"host": "localhost"}, "plaintext (loopback only)"),
    ({"host": "0.0.0.0", "insecure": True}, "plaintext (--insecure)"),
    ({"host": "0.0.0.0", "tls": True}, "TLS"),
    ({"host": "127.0.0.1", "tls": True, "mtls": True}, "mTLS"),
])
def test_start_up_log_says_how_the_server_is_reached(pki: Pki, caplog: pytest.LogCaptureFixture,
                                                     options: dict, description: str):
    options = dict(options)
    if options.pop("tls", False):
        options.update(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    if options.pop("mtls", False):
        options["tls_client_ca"] = str(pki.ca)
    with caplog.at_level(logging.INFO, logger="optserve.server"):
        built = create_server(ServerOptions(port=0, **options))
    built.server.stop(None)
    assert any(record.getMessage().endswith(f": {description}") for record in caplog.records), caplog.text


def test_tokens_over_insecure_plaintext_are_warned_about(token_file: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="optserve.server"):
        built = create_server(ServerOptions(host="0.0.0.0", port=0, insecure=True, token_file=str(token_file)))
    built.server.stop(None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("plaintext" in message for message in warnings), caplog.text
    assert not any(token in caplog.text for token in TOKENS)


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("[::]", False), ("10.0.0.1", False),
    ("example.com", False), ("", False),
])
def test_loopback_addresses(host: str, loopback: bool):
    assert is_loopback(host) is loopback


def test_serve_command_passes_the_security_flags(pki: Pki, token_file: Path, name: str):
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca),
            "--token-file", str(token_file)]
    with ServerProcess(args) as process:
        tls = TLS(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        with Client(process.address, timeout=60, tls=tls, token=TOKENS[1]) as client:
            round_trip(client, name)
        with Client(process.address, timeout=60, tls=tls) as client:
            with pytest.raises(OptserveError) as caught:
                client.list_optimizers()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert any("mTLS" in line for line in process.lines), "".join(process.lines)


# --- the metrics endpoint -------------------------------------------------------------------------------------


def _metrics_port(process: ServerProcess) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in process.lines:
            found = re.search(r"metrics on (https?)://([^:]+):(\d+)/metrics", line)
            if found:
                return int(found.group(3))
        time.sleep(0.1)
    raise AssertionError("no metrics line in the log:\n" + "".join(process.lines))


def _scrape(url: str, context=None, token: str | None = None) -> tuple[int, bytes]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _client_context(pki: Pki, cert: bool):
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def test_metrics_are_served_over_the_grpc_tls_and_need_a_token(pki: Pki, token_file: Path):
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--token-file", str(token_file),
            "--metrics-port", "0"]
    with ServerProcess(args) as process:
        url = f"https://127.0.0.1:{_metrics_port(process)}/metrics"
        status, body = _scrape(url, _client_context(pki, cert=False), TOKENS[1])
        assert status == 200 and b"# TYPE optserve_steps_total counter" in body
        for token in (None, "wrong-token"):
            status, body = _scrape(url, _client_context(pki, cert=False), token)
            assert status == 401 and b"token" in body and b"optserve_" not in body
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):  # plaintext gets no metrics
            _scrape(url.replace("https://", "http://"))


def test_metrics_under_mtls_need_a_client_certificate(pki: Pki):
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca),
            "--metrics-port", "0"]
    with ServerProcess(args) as process:
        url = f"https://127.0.0.1:{_metrics_port(process)}/metrics"
        assert _scrape(url, _client_context(pki, cert=True))[0] == 200
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            _scrape(url, _client_context(pki, cert=False))


def _listening_address(port: int) -> str:
    """The local address a TCP socket listens on at `port` (from /proc/net/tcp and tcp6)."""
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # LISTEN
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is host order
                return socket.inet_ntop(family, raw)
    raise AssertionError(f"nothing listens on port {port}")


def test_metrics_stay_on_loopback_unless_a_flag_says_otherwise(token_file: Path):
    with ServerProcess(["--host", "0.0.0.0", "--insecure", "--metrics-port", "0"]) as process:
        port = _metrics_port(process)
        assert _listening_address(port) == "127.0.0.1"
        assert _scrape(f"http://127.0.0.1:{port}/metrics")[0] == 200
    with ServerProcess(["--metrics-port", "0", "--metrics-host", "0.0.0.0", "--insecure"]) as process:
        assert _listening_address(_metrics_port(process)) == "0.0.0.0"
    refused = subprocess.run([sys.executable, "-m", "optserve.server.cli", "serve", "--port", "0", "--metrics-port",
                              "0", "--metrics-host", "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "/metrics" in refused.stderr and "--insecure" in refused.stderr and "--tls-cert" in refused.stderr
