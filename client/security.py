"""The client's channel: plaintext or TLS (mTLS with a client certificate), with an optional bearer token.

Over TLS the token goes as call credentials (`grpc.access_token_call_credentials`).
gRPC sends call credentials only over a secure channel, so over plaintext (a
server on loopback, or one started with --insecure) a client interceptor adds the
same `authorization: Bearer <token>` metadata to every call.
"""

import os
from collections import namedtuple
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TLS:
    """How a client checks the server, and proves itself with a certificate (mTLS).

    `ca`: PEM file of the CA(s) that signed the server's certificate; None uses the
    system roots. `cert` and `key`: PEM client certificate chain and private key,
    for a server started with --tls-client-ca. `server_name`: the name to expect
    in the server's certificate instead of the host of the address (e.g.
    "localhost" when dialing 127.0.0.1).
    """

    ca: str | os.PathLike | None = None
    cert: str | os.PathLike | None = None
    key: str | os.PathLike | None = None
    server_name: str | None = None


def as_tls(tls: "bool | str | os.PathLike | TLS | None") -> TLS | None:
    """`Client(tls=...)` as a TLS: True means system roots, a path means that CA file, None or False plaintext."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return TLS()
    if isinstance(tls, TLS):
        return tls
    if isinstance(tls, (str, os.PathLike)):
        return TLS(ca=tls)
    raise TypeError(f"tls must be True, a CA file path or optserve.client.TLS, got {type(tls).__name__}")


def make_channel(address: str, options: Sequence[tuple[str, object]], tls: TLS | None,
                 token: str | None) -> grpc.Channel:
    """A channel to `address`: TLS when `tls` is given, and `authorization: Bearer <token>` on every call."""
    if tls is None:
        channel = grpc.insecure_channel(address, options=list(options))
        return channel if token is None else grpc.intercept_channel(channel, _BearerToken(token))
    if (tls.cert is None) != (tls.key is None):
        raise ValueError("TLS(cert=..., key=...): a client certificate needs its key, and a key its certificate")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca), private_key=_read(tls.key), certificate_chain=_read(tls.cert))
    if token is not None:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    if tls.server_name is not None:
        options = [*options, ("grpc.ssl_target_name_override", tls.server_name)]
    return grpc.secure_channel(address, credentials, options=list(options))


def _read(path: str | os.PathLike | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


class _CallDetails(
        namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call on a plaintext channel."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), self._header],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)
