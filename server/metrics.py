"""Prometheus metrics of a server, every name prefixed `optserve_`, labelled by optimizer.

Each server has its own collector registry (so several servers in one process
keep apart) served over HTTP by `start_http`. A disabled `Metrics` still
counts, but skips the work only a scrape would read (the gradient norm).
"""

import ssl
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import prometheus_client as prom

STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)
STEP_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TRANSPORTS = ("grpc", "shared_memory", "bulk")  # how tensor bytes reached or left the server
OUTCOMES = ("accepted", "duplicate")
REASONS = ("invalid_argument", "not_found", "failed_precondition", "aborted", "resource_exhausted",
           "deadline_exceeded", "unavailable", "cancelled", "internal")  # status codes a push can be refused with


class Metrics:
    """The counters, gauges and histograms the registry and the service report to."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.registry = prom.CollectorRegistry()
        label = ["optimizer"]
        self.steps = prom.Counter("optserve_steps", "steps applied", label, registry=self.registry)
        self.pushes = prom.Counter("optserve_pushes", "pushes accepted; outcome is accepted (new) or duplicate (a retry answered)",
                                   [*label, "outcome"], registry=self.registry)
        self.refused = prom.Counter("optserve_pushes_refused", "pushes refused, by reason (the status code)",
                                    [*label, "reason"], registry=self.registry)
        self.staleness = prom.Histogram("optserve_push_staleness_versions",
                                        "versions between an accepted push's base_version and the version it "
                                        "was applied to", label, buckets=STALENESS_BUCKETS, registry=self.registry)
        self.grad_norm = prom.Gauge("optserve_gradient_global_norm",
                                    "global L2 norm of the last step's gradient, before clipping", label,
                                    registry=self.registry)
        self.step_seconds = prom.Histogram("optserve_step_seconds", "time to log and apply one step", label,
                                           buckets=STEP_SECONDS_BUCKETS, registry=self.registry)
        by_transport = ["optimizer", "transport"]  # transport: one of TRANSPORTS
        self.bytes_received = prom.Counter("optserve_received_bytes", "tensor bytes received (creates, pushes)",
                                           by_transport, registry=self.registry)
        self.bytes_sent = prom.Counter("optserve_sent_bytes", "tensor bytes sent (pulls)", by_transport,
                                       registry=self.registry)
        self.rounds_timed_out = prom.Counter("optserve_sync_rounds_closed_by_timeout",
                                             "sync rounds applied with fewer gradients than num_workers", label,
                                             registry=self.registry)
        self.version = prom.Gauge("optserve_version", "current version of the weights", label,
                                  registry=self.registry)
        self.inflight_bytes = prom.Gauge("optserve_inflight_bytes",
                                         "receive-buffer bytes held by requests in flight and open sync rounds "
                                         "(limit: max_inflight_bytes)", registry=self.registry)
        self.shared_memory_segments = prom.Gauge("optserve_shared_memory_segments",
                                                 "same-host shared-memory segments open (limit: shm_max_segments)",
                                                 registry=self.registry)
        self.calls_held = prom.Gauge("optserve_calls_in_progress",
                                     "calls in progress per budget (stream, waiting, reflection, watch, reading)", ["budget"],
                                     registry=self.registry)
        self.bulk_channels = prom.Gauge("optserve_bulk_channels", "bulk channels open (connections bound by a ticket)",
                                        registry=self.registry)

    def observe_step(self, optimizer: str, seconds: float, version: int,
                     grads: Mapping[str, np.ndarray | tuple[np.ndarray, np.ndarray]], squares: float | None = None,
                     ) -> None:
        """One applied step: its latency, the new version and (when enabled) the gradient's norm.

        `squares`: the gradients' sum of squares when already known (taken as they arrived), else summed here.
        """
        self.steps.labels(optimizer).inc()
        self.step_seconds.labels(optimizer).observe(seconds)
        self.version.labels(optimizer).set(version)
        if self.enabled:
            self.grad_norm.labels(optimizer).set(global_norm(grads.values()) if squares is None else squares ** 0.5)

    def forget(self, optimizer: str) -> None:
        """Drops every series of a deleted optimizer."""
        series = [(metric, (optimizer,)) for metric in (
            self.steps, self.staleness, self.grad_norm, self.step_seconds, self.rounds_timed_out, self.version)]
        series += [(metric, (optimizer, transport)) for metric in (self.bytes_received, self.bytes_sent)
                   for transport in TRANSPORTS]
        series += [(self.pushes, (optimizer, outcome)) for outcome in OUTCOMES]
        series += [(self.refused, (optimizer, reason)) for reason in REASONS]
        for metric, labels in series:
            try:
                metric.remove(*labels)
            except KeyError:  # never observed
                pass

    def start_http(self, port: int, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None,
                   check_token: Callable[[str | None], str | None] | None = None) -> tuple[object, int]:
        """Serves /metrics (HTTPS with `ssl_context`, tokens checked by `check_token`); returns the server and port."""
        from optserve.server.metrics_http import serve_metrics

        return serve_metrics(self.registry, port, host, ssl_context, check_token)


def global_norm(grads: Iterable[np.ndarray | tuple[np.ndarray, np.ndarray]]) -> float:
    """sqrt of the sum of squares of every gradient value, as Keras's global clipping sees them (sparse rows raw)."""
    total = 0.0
    for grad in grads:
        values = np.asarray(grad[1] if isinstance(grad, tuple) else grad, np.float32).ravel()
        total += float(np.dot(values, values))
    return total ** 0.5

