"""Settings of a server, kept free of heavy imports so the CLI can read them."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerOptions:
    """Settings of one server; every field has a `serve` flag of the same name."""

    host: str = "127.0.0.1"
    port: int = 50051
    max_workers: int = 64  # threads serving RPCs; sync workers waiting in a pull each hold one
    max_request_bytes: int = 16 << 30  # tensor bytes one create or push may carry
    grace: float = 10.0  # seconds calls in flight get to finish on shutdown
