"""Settings of a server, kept free of heavy imports so the CLI can read them."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerOptions:
    """Settings of one server; every field has a `serve` flag of the same name."""

    host: str = "127.0.0.1"
    port: int = 50051
    max_workers: int | None = None  # threads serving RPCs; None: max_streams + 40 (admission.Limits)
    max_request_bytes: int = 16 << 30  # tensor bytes one create or push may carry
    max_tensor_bytes: int = 8 << 30  # bytes of any one parameter tensor
    max_inflight_bytes: int | None = None  # receive-buffer bytes of all requests in flight; None: half the memory
    bulk_port: int = 0  # the bulk channels' TCP port, on --host; 0 picks a free one, -1 turns bulk channels off
    max_optimizers: int = 1000  # optimizers one server holds
    max_tensors: int = 1024  # tensors of one optimizer; the first step's compile time and memory grow with it
    max_concurrent_rpcs: int = 1000  # calls in progress at once; more get RESOURCE_EXHAUSTED
    max_streams: int = 256  # create, push and pull streams in progress at once (each holds a thread)
    max_streams_per_connection: int = 64  # of those, from one connection
    max_waiting_calls: int = 128  # of those, pulls waiting for min_version and sync pushes waiting for their round
    stream_idle_timeout: float = 30.0  # seconds a stream may wait for its peer's next message (or to read one)
    grace: float = 10.0  # seconds calls in flight get to finish on shutdown
    data_dir: str | None = None  # where state persists; None keeps it in memory only
    durability: str = "wal"  # with a data dir: "wal" logs every change before acknowledging it; "none" does not
    checkpoint_every: int = 1000  # steps between checkpoints
    checkpoint_interval: float = 300.0  # seconds between checkpoints of an optimizer that changed
    accept_log_loss: bool = False  # restore past a damaged or missing log (its rest kept aside); else refuse to start
    tls_cert: str | None = None  # PEM certificate chain of the server; with tls_key, serve TLS
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA bundle; with it, require and verify client certificates (mTLS)
    token_file: str | None = None  # bearer tokens, one per line; every call but health and reflection needs one
    insecure: bool = False  # allow plaintext on a non-loopback host
    metrics_port: int | None = None  # serve Prometheus metrics over HTTP here (0 picks a port); None: off
    metrics_host: str = "127.0.0.1"  # address /metrics binds; HTTPS when TLS is configured, and tokens apply
    shm_dir: str = "/dev/shm"  # where same-host segments are created; "" turns the same-host path off
    shm_idle_timeout: float = 60.0  # seconds a same-host segment may go unused before it is freed
    shm_max_segments: int = 256  # same-host segments open at once, in all
    shm_max_segments_per_optimizer: int = 32  # of those, for one optimizer
    shm_max_bytes: int | None = None  # bytes of all same-host segments; None: half of max_inflight_bytes
    log_format: str = "text"  # "text" or "json"
    log_level: str = "INFO"
    devices: str = "1"  # local devices each optimizer's state is spread over: a count, or "all"
