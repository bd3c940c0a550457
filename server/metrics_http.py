"""Serves a Prometheus registry at /metrics over HTTP or HTTPS, with an optional bearer token.

The TLS handshake runs on each connection's own thread (not in the accept
loop), and a connection gets 10 s per read, so a peer that connects and sends
nothing cannot stop the endpoint.
"""

import logging
import socket
import socketserver
import ssl
import sys
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client as prom

log = logging.getLogger("optserve.metrics")

CONNECTION_TIMEOUT = 10.0  # seconds a metrics connection may wait for its peer


class _Quiet(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT

    def log_message(self, format, *args) -> None:  # noqa: A002 (the stdlib's name)
        pass  # scrapes are not worth a log line each


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """One line, not a traceback: a failed handshake or a dropped scrape is the peer's problem."""
        log.info("metrics request from %s failed: %s", client_address[0], sys.exc_info()[1])


def serve_metrics(registry: prom.CollectorRegistry, port: int, host: str, ssl_context: ssl.SSLContext | None = None,
                  check_token: Callable[[str | None], str | None] | None = None) -> tuple[WSGIServer, int]:
    """Starts /metrics on a daemon thread; returns the server and its bound port.

    `check_token(authorization_header)` returns None to accept a scrape, or why
    it is refused (answered 401 with `WWW-Authenticate: Bearer`).
    """
    metrics_app = prom.make_wsgi_app(registry)

    def app(environ, start_response):
        problem = None if check_token is None else check_token(environ.get("HTTP_AUTHORIZATION"))
        if problem is not None:
            start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                                ("WWW-Authenticate", 'Bearer realm="optserve metrics"')])
            return [f"{problem}; send 'Authorization: Bearer <token>'\n".encode()]
        return metrics_app(environ, start_response)

    server_class = _ThreadingServer
    if ":" in host.strip("[]"):
        server_class = type("_ThreadingServer6", (_ThreadingServer,), {"address_family": socket.AF_INET6})
    httpd = make_server(host.strip("[]"), port, app, server_class, handler_class=_Quiet)
    if ssl_context is not None:
        httpd.socket = ssl_context.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=httpd.serve_forever, name="optserve-metrics", daemon=True).start()
    return httpd, httpd.server_port
