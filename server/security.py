"""Transport security and bearer tokens for a server.

`ServerSecurity.from_options` checks the security flags and reads their files
before anything binds: `--tls-cert` and `--tls-key` serve TLS, `--tls-client-ca`
adds client certificates (mTLS), `--token-file` requires `authorization: Bearer
<token>` on every call but the health service and server reflection. Without
TLS the server binds loopback only, unless `--insecure` says otherwise.
"""

import hashlib
import hmac
import ipaddress
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from optserve.server.options import ServerOptions

log = logging.getLogger("optserve.server")

# Probes and tooling call these without a token.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class SecurityConfigError(ValueError):
    """The security flags are inconsistent or name an unusable file; the server does not start."""


@dataclass(frozen=True)
class ServerSecurity:
    """How a server binds (credentials or plaintext) and what it requires of each call."""

    credentials: grpc.ServerCredentials | None  # None: plaintext
    interceptors: tuple[grpc.ServerInterceptor, ...]  # the token check, when there are tokens
    description: str  # "TLS", "mTLS", "plaintext (loopback only)" or "plaintext (--insecure)"

    @classmethod
    def from_options(cls, options: ServerOptions) -> "ServerSecurity":
        """Checks the flags and reads certificates and tokens; SecurityConfigError names the flag at fault."""
        credentials, description = _credentials(options)
        tokens = load_tokens(options.token_file) if options.token_file is not None else ()
        if credentials is None and not is_loopback(options.host):
            if not options.insecure:
                raise SecurityConfigError(
                    f"refusing to serve plaintext on {options.host}, which is not a loopback address: "
                    "give --tls-cert and --tls-key to serve TLS, or --insecure to serve plaintext anyway")
            if tokens:
                log.warning("bearer tokens travel in plaintext on %s (--insecure); anyone on the network "
                            "can read them", options.host)
        if (options.metrics_port is not None and credentials is None and not is_loopback(options.metrics_host)
                and not options.insecure):
            raise SecurityConfigError(
                f"refusing to serve /metrics in plaintext on {options.metrics_host}, which is not a loopback "
                "address: give --tls-cert and --tls-key to serve it over HTTPS, or --insecure")
        interceptors = (TokenInterceptor(tokens),) if tokens else ()
        if tokens:
            description += f", bearer token required ({len(tokens)} accepted)"
        return cls(credentials, interceptors, description)

    @property
    def metrics_description(self) -> str:
        """How /metrics is protected: the same TLS as gRPC, and the same tokens."""
        transport = self.description.split(",")[0]
        return transport + (", bearer token required" if self.interceptors else "")

    def metrics_ssl_context(self, options: ServerOptions) -> ssl.SSLContext | None:
        """The HTTPS settings of /metrics: gRPC's certificate, and its client CA under mTLS; None for plaintext."""
        if self.credentials is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(options.tls_cert, options.tls_key)
        if options.tls_client_ca is not None:
            context.load_verify_locations(cafile=options.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def bulk_ssl_context(self, options: ServerOptions) -> ssl.SSLContext | None:
        """The TLS of the bulk channels: as /metrics', gRPC's certificate and, under mTLS, its client CA."""
        return self.metrics_ssl_context(options)

    def check_token(self, authorization: str | None) -> str | None:
        """None when an `Authorization` header value carries an accepted token (or none is required), else why not."""
        for interceptor in self.interceptors:
            if isinstance(interceptor, TokenInterceptor):
                return interceptor._check([] if authorization is None else [("authorization", authorization)])
        return None

    def bind(self, server: grpc.Server, address: str) -> int:
        """Adds the listening port; returns the port bound, 0 if binding failed."""
        if self.credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.credentials)


def _credentials(options: ServerOptions) -> tuple[grpc.ServerCredentials | None, str]:
    if (options.tls_cert is None) != (options.tls_key is None):
        raise SecurityConfigError("--tls-cert and --tls-key go together: give both to serve TLS")
    if options.tls_cert is None:
        if options.tls_client_ca is not None:
            raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key (mTLS runs over TLS)")
        return None, "plaintext (--insecure)" if options.insecure else "plaintext (loopback only)"
    key_and_cert = [(_read(options.tls_key, "--tls-key"), _read(options.tls_cert, "--tls-cert"))]
    if options.tls_client_ca is None:
        return grpc.ssl_server_credentials(key_and_cert), "TLS"
    client_ca = _read(options.tls_client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials(key_and_cert, root_certificates=client_ca, require_client_auth=True), "mTLS"


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SecurityConfigError(f"{flag} {path}: cannot read it: {err.strerror or err}") from None


def load_tokens(path: str) -> tuple[bytes, ...]:
    """The tokens of a token file: one per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SecurityConfigError(f"--token-file {path}: cannot read it: {err}") from None
    tokens = tuple(line.strip().encode() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not tokens:
        raise SecurityConfigError(f"--token-file {path}: holds no token (one per line; blank lines and # comments "
                                  "are skipped); refusing to start with no way to authenticate")
    return tokens


def is_loopback(host: str) -> bool:
    """Whether `host` is localhost or a loopback address (127.0.0.0/8, ::1); other names count as not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TokenInterceptor(grpc.ServerInterceptor):
    """Answers UNAUTHENTICATED to calls without one of `tokens` as `authorization: Bearer <token>`.

    Each presented token is compared with every accepted one in constant time
    (SHA-256 digests through hmac.compare_digest, no early exit), and never
    logged or echoed. Health and reflection calls pass without a token.
    """

    def __init__(self, tokens: Sequence[bytes]):
        self._digests = tuple(hashlib.sha256(token).digest() for token in tokens)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES):
            return continuation(handler_call_details)
        problem = self._check(handler_call_details.invocation_metadata or ())
        if problem is None:
            return continuation(handler_call_details)
        log.warning("refused %s: UNAUTHENTICATED (%s)", method, problem)
        return _refusal(continuation(handler_call_details), f"{problem}; send 'authorization: Bearer <token>' "
                                                            "metadata with a token the server accepts")

    def _check(self, metadata) -> str | None:
        """None when the call carries an accepted token, else what is wrong, without the token."""
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return "missing bearer token"
        value = values[0].decode("utf-8", "replace") if isinstance(values[0], bytes) else values[0]
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "authorization metadata is not 'Bearer <token>'"
        digest = hashlib.sha256(token.strip().encode()).digest()
        accepted = False
        for known in self._digests:  # every token, no early exit
            accepted |= hmac.compare_digest(digest, known)
        return None if accepted else "invalid bearer token"


def _refusal(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler answering for `handler` that aborts with UNAUTHENTICATED before reading the request."""

    def abort(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # Request-streaming whatever the method: gRPC would read a unary request before calling `abort`, and hold
    # the thread for as long as a client withholds it. An unknown method is UNAUTHENTICATED too, rather than
    # revealing which methods exist.
    if handler is None:
        return grpc.stream_unary_rpc_method_handler(abort)
    make: Callable = grpc.stream_stream_rpc_method_handler if handler.response_streaming else \
        grpc.stream_unary_rpc_method_handler
    return make(abort, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
