"""Budgets for the calls that hold a server thread, so idle or hostile calls cannot take them all.

gRPC's sync server runs each call on a thread of one pool. A call that waits
for its peer (a stream whose next message does not come, a reply the peer does
not read) or for the optimizer (a pull's `min_version`, a sync push's round)
holds its thread all along. So each such class of call has a budget, counted
server-wide and per connection (the peer's address), and a call over budget is
refused at once with RESOURCE_EXHAUSTED naming the limit. The pool is larger
than every budget together, so health checks and short calls always find a
thread. A stream that waits for its peer longer than `--stream-idle-timeout`
is cancelled; so is a unary call whose request message does not come (its
request is read as a stream of one, with a budget per connection). The health
service's Watch streams hold no thread (they are served non-blocking, their
answers sent by one sender thread) and have a budget of their own.
"""

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from optserve.server.errors import InvalidArgument, ResourceExhausted
from optserve.server.metrics import Metrics
from optserve.server.options import ServerOptions

log = logging.getLogger("optserve.admission")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
MAX_REFLECTION_STREAMS = 8  # reflection streams open at once, server-wide (each holds a thread)
MAX_WATCH_STREAMS = 1000  # health Watch streams open at once, server-wide (they hold no thread)
MAX_WATCH_STREAMS_PER_CONNECTION = 16
MAX_READING_PER_CONNECTION = 8  # unary calls of one connection whose request message has not come yet
RESERVE_THREADS = 32  # threads beyond every budget: unary calls, health checks, refusals


class LimitsConfigError(ValueError):
    """The limit flags contradict each other; the server does not start."""


@dataclass(frozen=True)
class Limits:
    """The budgets of one server and the thread pool they fit in."""

    max_streams: int  # optimizer-service streams (create, push, pull) in progress
    max_streams_per_connection: int
    max_waiting_calls: int  # of those, calls waiting for a version (pull min_version, sync push)
    stream_idle_timeout: float  # seconds a stream may wait for its peer
    max_workers: int  # threads of the main pool

    @classmethod
    def from_options(cls, options: ServerOptions) -> "Limits":
        """Checks the limit flags; the pool defaults to every budget plus a reserve."""
        for flag, value in (("--max-streams", options.max_streams),
                            ("--max-streams-per-connection", options.max_streams_per_connection),
                            ("--max-waiting-calls", options.max_waiting_calls)):
            if value < 1:
                raise LimitsConfigError(f"{flag} {value}: must be at least 1")
        if not options.stream_idle_timeout > 0:
            raise LimitsConfigError(f"--stream-idle-timeout {options.stream_idle_timeout}: must be > 0 seconds")
        if options.max_waiting_calls > options.max_streams:
            raise LimitsConfigError(f"--max-waiting-calls {options.max_waiting_calls}: waiting calls are streams, "
                                    f"so it cannot exceed --max-streams {options.max_streams}")
        needed = options.max_streams + MAX_REFLECTION_STREAMS + RESERVE_THREADS
        workers = needed if options.max_workers is None else options.max_workers
        if workers < needed:
            raise LimitsConfigError(
                f"--max-workers {workers}: must be at least --max-streams ({options.max_streams}) + "
                f"{MAX_REFLECTION_STREAMS} reflection streams + {RESERVE_THREADS} reserve = {needed}, or idle "
                "streams could take every thread")
        held = options.max_streams + MAX_REFLECTION_STREAMS
        if options.max_concurrent_rpcs <= held:  # gRPC counts every call, before any budget sees it
            log.warning("--max-concurrent-rpcs %d is not above the %d calls the budgets let wait (--max-streams + "
                        "%d reflection streams): waiting calls can take every slot, health checks' included",
                        options.max_concurrent_rpcs, held, MAX_REFLECTION_STREAMS)
        return cls(options.max_streams, options.max_streams_per_connection, options.max_waiting_calls,
                   options.stream_idle_timeout, workers)


class Slot:
    """One admitted call of a budget; `release` gives it back (more than once is harmless)."""

    def __init__(self, release: Callable[[], None]):
        self._release = release
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._release()

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class Admission:
    """Counts the calls of each budget, refuses those over it, and cancels streams idle too long."""

    def __init__(self, limits: Limits, metrics: Metrics | None = None):
        self.limits = limits
        self._metrics = metrics or Metrics()
        self._lock = threading.Lock()
        self._total: Counter[str] = Counter()  # budget -> calls held
        self._per_peer: Counter[tuple[str, str]] = Counter()  # (budget, peer) -> calls held
        self._watched: dict[int, "_Activity"] = {}
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # (send, response) of health Watch streams
        self._sender: threading.Thread | None = None
        self._caps = {  # budget -> (server-wide, per connection, the flag or constant that sets it)
            "stream": (limits.max_streams, limits.max_streams_per_connection,
                       "--max-streams", "--max-streams-per-connection"),
            "waiting": (limits.max_waiting_calls, None, "--max-waiting-calls", None),
            "reflection": (MAX_REFLECTION_STREAMS, None, "reflection streams", None),
            "watch": (MAX_WATCH_STREAMS, MAX_WATCH_STREAMS_PER_CONNECTION, "health Watch streams",
                      "health Watch streams per connection"),
            "reading": (None, MAX_READING_PER_CONNECTION, None, "unary calls waiting for their request"),
        }
        for budget in self._caps:  # read at scrape time: nothing to update per call
            self._metrics.calls_held.labels(budget).set_function(lambda budget=budget: self._total[budget])

    def admit(self, budget: str, peer: str) -> Slot:
        """A slot of `budget` for a call from `peer`, or RESOURCE_EXHAUSTED naming the limit it would exceed."""
        total_cap, peer_cap, total_name, peer_name = self._caps[budget]
        with self._lock:
            if total_cap is not None and self._total[budget] >= total_cap:
                raise ResourceExhausted(f"{budget}: the server has {total_cap} {_plural(budget)} in progress, "
                                        f"its limit ({total_name}); retry later")
            if peer_cap is not None and self._per_peer[budget, peer] >= peer_cap:
                raise ResourceExhausted(f"{budget}: this connection has {peer_cap} {_plural(budget)} in progress, "
                                        f"its limit ({peer_name}); retry later or use another connection")
            self._total[budget] += 1
            self._per_peer[budget, peer] += 1
        return Slot(lambda: self._give_back(budget, peer))

    def held(self, budget: str) -> int:
        """Calls of `budget` in progress now."""
        with self._lock:
            return self._total[budget]

    def watch_idle(self, context: grpc.ServicerContext) -> "_Activity":
        """Starts watching one stream: cancelled when it waits for its peer longer than the idle timeout."""
        activity = _Activity(context)
        with self._lock:
            self._watched[id(activity)] = activity
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch_loop, name="optserve-idle-watchdog", daemon=True)
                self._watchdog.start()
        return activity

    def unwatch(self, activity: "_Activity") -> None:
        with self._lock:
            self._watched.pop(id(activity), None)

    def deferred(self, send: Callable[[object], None]) -> Callable[[object], None]:
        """`send`, called later on one sender thread: a health Watch's answers must not block their caller.

        The health servicer sends to every watcher under its lock, and gRPC's
        send waits for its polling thread, which may be running a Watch's
        end-of-call callback, which takes that lock: sent inline, they deadlock.
        """
        with self._lock:
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_loop, name="optserve-watch-sender", daemon=True)
                self._sender.start()
        return lambda response: self._outbox.put((send, response))

    def close(self) -> None:
        """Stops the watchdog and the sender (on shutdown)."""
        self._stop.set()
        self._outbox.put(None)

    def _send_loop(self) -> None:
        while (item := self._outbox.get()) is not None:
            send, response = item
            try:
                send(response)
            except Exception as err:  # a call that ended meanwhile
                log.debug("health Watch answer not sent: %s", err)

    def _give_back(self, budget: str, peer: str) -> None:
        with self._lock:
            self._total[budget] -= 1
            self._per_peer[budget, peer] -= 1
            if not self._per_peer[budget, peer]:
                del self._per_peer[budget, peer]

    def _watch_loop(self) -> None:
        timeout = self.limits.stream_idle_timeout
        while not self._stop.wait(min(timeout / 4, 1.0)):
            now = time.monotonic()
            with self._lock:
                idle = [a for a in self._watched.values() if a.waiting_since is not None
                        and now - a.waiting_since > timeout]
                for activity in idle:
                    self._watched.pop(id(activity), None)
            for activity in idle:
                log.info("cancelled a stream from %s: its peer sent or read nothing for %.3g s "
                         "(--stream-idle-timeout)", activity.context.peer(), timeout)
                activity.context.cancel()


class _Activity:
    """When a stream began waiting for its peer (None while it is not waiting)."""

    __slots__ = ("context", "waiting_since")

    def __init__(self, context: grpc.ServicerContext):
        self.context = context
        self.waiting_since: float | None = None

    def requests(self, iterator: Iterator) -> Iterator:
        """The messages of `iterator`, the wait for each one watched."""
        while True:
            self.waiting_since = time.monotonic()
            try:
                message = next(iterator)
            except StopIteration:
                return
            finally:
                self.waiting_since = None
            yield message

    def responses(self, iterator: Iterator) -> Iterator:
        """The messages of `iterator`; the time gRPC takes to send each (the peer reading it) is watched."""
        for message in iterator:
            self.waiting_since = time.monotonic()
            yield message
            self.waiting_since = None


def _plural(budget: str) -> str:
    return {"stream": "streams", "waiting": "waiting calls", "reflection": "reflection streams",
            "watch": "health Watch streams", "reading": "unary calls waiting for their request"}[budget]


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Admits each call that can hold a thread into its budget, and watches its streams for idleness.

    Runs inside the error mapping (its refusals become statuses) and after the
    token check (unauthenticated calls are refused before they count).
    """

    def __init__(self, admission: Admission, service_prefix: str):
        self._admission = admission
        self._service_prefix = service_prefix

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if method.startswith(HEALTH_PREFIX):
            if handler.unary_stream is not None and getattr(handler.unary_stream, "experimental_non_blocking", False):
                handler = handler._replace(unary_stream=self._watch_stream(handler.unary_stream))
        elif method.startswith(REFLECTION_PREFIXES):
            handler = self._streamed(handler, "reflection")
        elif method.startswith(self._service_prefix) and (handler.request_streaming or handler.response_streaming):
            handler = self._streamed(handler, "stream")
        return handler if handler.request_streaming else self._request_as_stream(handler)

    def _request_as_stream(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """A unary-request handler as a request-streaming one that reads its one message under the watchdog.

        gRPC reads a unary request on the call's thread before the method runs,
        with no timeout: a client that never sends it would hold the thread.
        """
        admission = self._admission

        def first_request(requests, context):
            with admission.admit("reading", context.peer()):
                activity = admission.watch_idle(context)
                try:
                    for request in activity.requests(requests):
                        return request
                finally:
                    admission.unwatch(activity)
            raise InvalidArgument("request: the call ended without its request message")

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            def unary(requests, context):
                return behavior(first_request(requests, context), context)

            unary.optserve_single_request = True
            return handler._replace(request_streaming=True, unary_unary=None, stream_unary=unary)
        behavior = handler.unary_stream

        def streaming(requests, context, *send_response_callback):  # a non-blocking one also gets a callback
            return behavior(first_request(requests, context), context, *send_response_callback)

        for attribute in ("experimental_non_blocking", "experimental_thread_pool"):
            if hasattr(behavior, attribute):
                setattr(streaming, attribute, getattr(behavior, attribute))
        streaming.optserve_single_request = True
        return handler._replace(request_streaming=True, unary_stream=None, stream_stream=streaming)

    def _streamed(self, handler: grpc.RpcMethodHandler, budget: str) -> grpc.RpcMethodHandler:
        admission = self._admission
        request_streaming = handler.request_streaming

        def admitted(request, context):
            slot = admission.admit(budget, context.peer())
            if not context.add_callback(slot.release):  # released when the call ends, however it ends
                slot.release()
            activity = admission.watch_idle(context)
            context.add_callback(lambda: admission.unwatch(activity))
            try:
                return activity, (activity.requests(request) if request_streaming else request)
            except BaseException:
                slot.release()
                raise

        def done(activity, context):
            admission.unwatch(activity)

        if handler.response_streaming:
            behavior = handler.stream_stream or handler.unary_stream

            def streaming(request, context):
                activity, request = admitted(request, context)
                try:
                    yield from activity.responses(behavior(request, context))
                finally:
                    done(activity, context)

            field = "stream_stream" if handler.stream_stream else "unary_stream"
            return handler._replace(**{field: streaming})
        behavior = handler.stream_unary or handler.unary_unary

        def unary(request, context):
            activity, request = admitted(request, context)
            try:
                return behavior(request, context)
            finally:
                done(activity, context)

        field = "stream_unary" if handler.stream_unary else "unary_unary"
        return handler._replace(**{field: unary})

    def _watch_stream(self, behavior: Callable) -> Callable:
        """Health Watch, served non-blocking (it holds no thread), within the Watch budget."""
        admission = self._admission

        def watch(request, context, send_response_callback=None):
            slot = admission.admit("watch", context.peer())
            if not context.add_callback(slot.release):  # the call ended already
                slot.release()
            return behavior(request, context, admission.deferred(send_response_callback))

        watch.experimental_non_blocking = True
        return watch
