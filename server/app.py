"""Builds and runs an optserve gRPC server (the composition root).

`create_server` binds and returns the real port without serving. `serve`
starts it, restores the data dir (health NOT_SERVING meanwhile, calls answered
UNAVAILABLE), reports SERVING, and runs until SIGTERM or SIGINT; then it
reports NOT_SERVING, refuses new calls, gives calls in flight `grace` seconds,
and checkpoints every optimizer, which empties the logs (exit status 1 if any
could not be saved).
"""

import logging
import signal
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from optserve.server.admission import Admission, AdmissionInterceptor, Limits
from optserve.server.bulk import BulkListener
from optserve.server.engine import devices
from optserve.server.metrics import Metrics
from optserve.server.options import ServerOptions
from optserve.server.registry import Persistence, Registry
from optserve.server.security import ServerSecurity
from optserve.server.service import SERVICE_NAME, ErrorInterceptor, OptimizerService, add_service
from optserve.server.storage import StorageError

log = logging.getLogger("optserve.server")

# gRPC transport settings (times in ms). Messages stay small (chunks of 1 MiB plus a header), so
# 16 MiB caps a runaway message without ever refusing a valid one. Keepalive pings find dead peers
# (a crashed worker's half-open connection) within about a minute and a half.
TRANSPORT_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.keepalive_time_ms", 60_000),  # ping an idle connection every 60 s
    ("grpc.keepalive_timeout_ms", 20_000),  # and drop it when the ping is not answered within 20 s
    ("grpc.keepalive_permit_without_calls", 1),  # also between calls (workers idle between steps)
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # accept client pings every 10 s or less often
    ("grpc.http2.max_pings_without_data", 0),  # any number of pings without data
]


@dataclass
class OptserveServer:
    """A bound gRPC server, its registry and its health service."""

    server: grpc.Server
    port: int
    registry: Registry
    health: health.HealthServicer
    admission: Admission | None = None
    security: ServerSecurity | None = None
    metrics_port: int | None = None  # where /metrics is served, once open
    bulk: BulkListener | None = None  # the bulk channels' listener; None with --bulk-port -1
    service: OptimizerService | None = None

    def open(self, options: ServerOptions | None = None) -> None:
        """Starts /metrics (if asked), restores the data dir, then reports SERVING and starts checkpointing."""
        if options is not None and options.metrics_port is not None:
            security = self.security or ServerSecurity.from_options(options)
            _, self.metrics_port = self.registry.metrics.start_http(
                options.metrics_port, options.metrics_host, security.metrics_ssl_context(options),
                security.check_token)
            log.info("metrics on %s://%s:%d/metrics (%s)", "https" if options.tls_cert else "http",
                     options.metrics_host, self.metrics_port, security.metrics_description)
        self.registry.restore()
        self.registry.start_checkpointer()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def shutdown(self, grace: float | None) -> Sequence[str]:
        """NOT_SERVING, refuse new calls, let calls in flight finish, checkpoint everything.

        Returns the names of the optimizers that could not be saved.
        """
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.bulk is not None:
            self.bulk.close()
        if self.admission is not None:
            self.admission.close()
        if self.service is not None:
            self.service.segments.close()
        return self.registry.save_all()


def create_server(options: ServerOptions, interceptors: Sequence[grpc.ServerInterceptor] = ()) -> OptserveServer:
    """A bound, not yet started server. `interceptors` run before the error mapping, outermost first.

    The token check (with `options.token_file`) runs after `interceptors`. Plaintext binds loopback only
    unless `options.insecure`; a SecurityConfigError names the flag at fault.
    """
    security = ServerSecurity.from_options(options)  # checks flags, reads keys and tokens before anything binds
    limits = Limits.from_options(options)
    persistence = None
    if options.data_dir is not None:
        persistence = Persistence(Path(options.data_dir), options.durability, options.checkpoint_every,
                                  options.checkpoint_interval, accept_log_loss=options.accept_log_loss)
    placement = devices.placement(options.devices)  # DevicesConfigError naming --devices, before anything binds
    registry = Registry(persistence, options.max_optimizers, Metrics(enabled=options.metrics_port is not None),
                        placement)
    if placement is not None:
        log.info("state spread over %d devices: %s", placement.count,
                 ", ".join(devices.describe_device(d) for d in placement.mesh.devices.flat))
    admission = Admission(limits, registry.metrics)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.max_workers, thread_name_prefix="optserve-rpc"),
        interceptors=[*interceptors, *security.interceptors, ErrorInterceptor(),
                      AdmissionInterceptor(admission, f"/{SERVICE_NAME}/")],
        options=TRANSPORT_OPTIONS,
        maximum_concurrent_rpcs=options.max_concurrent_rpcs,
    )
    port = security.bind(server, f"{options.host}:{options.port}")
    if port == 0:
        raise OSError(f"cannot bind {options.host}:{options.port}")
    bulk = None
    if options.bulk_port >= 0:  # same host and interface as gRPC, the same TLS (and client CA) as gRPC
        bulk = BulkListener(options.host, options.bulk_port, security.bulk_ssl_context(options),
                            options.stream_idle_timeout)
        log.info("bulk channels on %s:%d (%s)", options.host, bulk.port, "TLS" if bulk.tls else "plaintext")
        registry.metrics.bulk_channels.set_function(bulk.open_channels)
    servicer = OptimizerService(registry, options, admission, bulk)
    add_service(servicer, server)
    health_servicer = health.HealthServicer(  # Watch holds no thread: it answers from set()
        experimental_non_blocking=True, experimental_thread_pool=None)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    log.info("bound %s:%d: %s", options.host, port, security.description)
    return OptserveServer(server, port, registry, health_servicer, admission, security, bulk=bulk, service=servicer)


def serve(options: ServerOptions) -> int:
    """Serves until SIGTERM or SIGINT, then drains, checkpoints and stops; returns an exit status."""
    import jax

    built = create_server(options)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop.set())
    built.server.start()
    log.info("listening on %s:%d (JAX device: %s)", options.host, built.port, jax.devices()[0])
    if options.data_dir is not None:
        log.info("restoring from %s (durability %s); NOT_SERVING until done", options.data_dir, options.durability)
    try:
        built.open(options)
    except StorageError as err:
        log.error("cannot restore the data dir, not serving: %s", err)
        built.server.stop(None)
        return 1
    log.info("serving %d optimizer(s)", len(built.registry.list()))
    while not stop.wait(1.0):  # a timed wait lets the signal handlers run
        pass
    log.info("shutting down: refusing new calls, %.0f s grace for calls in flight", options.grace)
    failed = built.shutdown(options.grace)
    if failed:
        log.error("stopped, but could not save %d optimizer(s): %s", len(failed), ", ".join(failed))
        return 1
    log.info("stopped")
    return 0
