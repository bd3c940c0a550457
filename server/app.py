"""Builds and runs an optserve gRPC server (the composition root).

`create_server` binds and returns the real port without serving; `serve`
runs until SIGTERM or SIGINT, then stops gracefully: new calls are refused and
calls in flight get `grace` seconds to finish.
"""

import logging
import signal
import threading
from collections.abc import Sequence
from concurrent import futures

import grpc

from optserve.server.options import ServerOptions
from optserve.server.registry import Registry
from optserve.server.service import ErrorInterceptor, OptimizerService
from optserve.v1 import optserve_pb2_grpc as pb_grpc

log = logging.getLogger("optserve.server")


def create_server(
    options: ServerOptions, interceptors: Sequence[grpc.ServerInterceptor] = ()
) -> tuple[grpc.Server, int, Registry]:
    """A bound, not yet started server; returns it, its port and its registry.

    `interceptors` run before the error mapping, outermost first.
    """
    registry = Registry()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix="optserve-rpc"),
        interceptors=[*interceptors, ErrorInterceptor()],
    )
    pb_grpc.add_OptimizerServiceServicer_to_server(OptimizerService(registry, options.max_request_bytes), server)
    port = server.add_insecure_port(f"{options.host}:{options.port}")
    if port == 0:
        raise OSError(f"cannot bind {options.host}:{options.port}")
    return server, port, registry


def serve(options: ServerOptions) -> None:
    """Serves until SIGTERM or SIGINT, then drains and stops."""
    import jax

    server, port, _ = create_server(options)
    server.start()
    log.info("serving on %s:%d (JAX device: %s)", options.host, port, jax.devices()[0])
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop.set())
    while not stop.wait(1.0):  # a timed wait lets the signal handlers run
        pass
    log.info("shutting down: refusing new calls, %.0f s grace for calls in flight", options.grace)
    server.stop(options.grace).wait()
    log.info("stopped")
