"""The gRPC face of the registry: thin RPC methods and one error interceptor.

Each RPC decodes its request with `codec`, calls the registry, and encodes the
reply. Domain errors become gRPC statuses in `ErrorInterceptor`, the one place
that maps them; anything unexpected becomes INTERNAL with its traceback logged.
"""

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from optserve.wire.chunks import stream_message_parser
from optserve.server import codec
from optserve.server.admission import Admission
from optserve.server.buffers import BufferPool, MemoryBudget, default_inflight_bytes
from optserve.server.bulk import BulkListener, Transfer
from optserve.server.errors import FailedPrecondition, InvalidArgument, OptserveError, ResourceExhausted
from optserve.server.options import ServerOptions
from optserve.server.optimizer import Optimizer
from optserve.server.overflow import Magnitude
from optserve.server.registry import Registry
from optserve.server.shared_memory import SegmentTable
from optserve.server.traffic import Traffic
from optserve.v1 import optserve_pb2 as pb
from optserve.v1 import optserve_pb2_grpc as pb_grpc

log = logging.getLogger("optserve.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["OptimizerService"].full_name  # "optserve.v1.OptimizerService"

_TRANSPORT_OF = {None: "grpc", "shared_memory_session": "shared_memory", "bulk": "bulk"}  # field -> metrics label
MAX_WAIT_SECONDS = 3600.0  # longest a call waits (a pull's min_version, a sync round) without a deadline



class OptimizerService(pb_grpc.OptimizerServiceServicer):
    """Implements optserve.v1.OptimizerService over a Registry."""

    def __init__(self, registry: Registry, options: ServerOptions, admission: Admission,
                 bulk: BulkListener | None = None):
        self._registry = registry
        self._bulk = bulk  # None: no bulk listener (--bulk-port -1)
        self._options = options
        limit = options.max_inflight_bytes if options.max_inflight_bytes is not None else default_inflight_bytes()
        self._buffers = BufferPool(MemoryBudget(limit, registry.metrics.inflight_bytes.set))
        log.info("requests in flight may hold %d bytes of tensors (max_inflight_bytes)", limit)
        self._admission = admission  # the budgets of calls that wait
        self.segments = SegmentTable(options.shm_dir, options.shm_idle_timeout, options.shm_max_segments,
                                     options.shm_max_segments_per_optimizer,
                                     options.shm_max_bytes if options.shm_max_bytes is not None else limit // 2,
                                     registry.metrics.shared_memory_segments.set)
        self._waker = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="optserve-waker")
        self._traffic = Traffic()  # which transport each client uses, for `optserve status`

    def CreateOptimizer(self, request_iterator, context) -> pb.OptimizerInfo:
        with self._buffers.lease("tensors", reuse=False) as lease:  # engine.pipeline.init copies the tensors out
            request = codec.decode_create(request_iterator, self._options.max_request_bytes,
                                          self._options.max_tensor_bytes, self._options.max_tensors,
                                          into=lease.reserve)
            optimizer = self._registry.create(
                request.name, request.config, request.params, request.non_finite_policy, request.training_mode,
                request.optimizer, request.shard, non_trainable=request.non_trainable)
        self._count(request.name, context, "grpc", received=_nbytes(request.params.values()))
        log.info("created optimizer %r: %d tensors", request.name, len(request.params))
        return self._info(optimizer)

    def GetOptimizer(self, request, context) -> pb.OptimizerInfo:
        return self._info(self._registry.get(request.name))

    def ListOptimizers(self, request, context) -> pb.ListOptimizersResponse:
        return pb.ListOptimizersResponse(optimizers=[self._info(o) for o in self._registry.list()])

    def DeleteOptimizer(self, request, context) -> pb.DeleteOptimizerResponse:
        optimizer = self._registry.get(request.name)
        self._registry.delete(request.name)
        self.segments.forget(optimizer)
        self._traffic.forget(request.name)
        log.info("deleted optimizer %r", request.name)
        return pb.DeleteOptimizerResponse()

    def PushGradients(self, request_iterator, context) -> pb.PushGradientsResponse:
        header, chunks = codec.split_push(request_iterator)
        transport = _TRANSPORT_OF[header.WhichOneof("source")]
        # A bulk channel is taken first: any refusal before its bytes are all in closes it (they cannot be skipped).
        bulk = self._take_bulk(header.bulk) if transport == "bulk" else None
        try:
            return self._push(header, chunks, transport, bulk, context)
        finally:
            if bulk is not None:
                bulk.end()

    def PullWeights(self, request, context) -> Iterator[pb.PullWeightsResponse]:
        kind = codec.decode_pull_kind(request)
        optimizer = self._registry.get(request.optimizer)
        transport = _TRANSPORT_OF[request.WhichOneof("destination")]
        min_version = request.min_version if request.HasField("min_version") else None
        # The snapshot's buffer goes back to the pool once sent: each message is a copy of its bytes.
        # Not charged to the in-flight budget: its size is the optimizer's own, not the caller's to declare.
        with contextlib.ExitStack() as holds:
            if min_version is not None:
                holds.enter_context(self._admission.admit("waiting", context.peer()))
            if transport == "shared_memory":  # one copy, out of the state into the segment; the reply is the header
                segment = holds.enter_context(self.segments.use(
                    request.shared_memory_session, optimizer, _caller(context), "pull"))
                into = segment.weights_into
            else:
                lease = holds.enter_context(self._buffers.lease("pull", charged=False))
                into = lambda nbytes: lease.reserve(nbytes, nbytes)  # noqa: E731
            version, iterations, arrays = optimizer.pull(
                kind, request.names, min_version, _wait_budget(context), into=into,
                cancelled=None if min_version is None else self._cancellation(context, optimizer))
            if transport != "bulk":  # the bytes go in the chunks, or are in the segment already
                self._count(optimizer.name, context, transport, sent=_nbytes(a for _, a in arrays))
                yield from codec.encode_pull(version, iterations, arrays, chunks=transport == "grpc")
                del arrays  # views of the segment: gone before it may be freed
                return
            bulk = self._take_bulk(request.bulk)
            try:  # the reply carries the header alone; the bytes go framed on the channel
                yield from codec.encode_pull(version, iterations, arrays, chunks=False)
                bulk.send(a for _, a in arrays)
            finally:
                bulk.end()
            self._count(optimizer.name, context, transport, sent=_nbytes(a for _, a in arrays))

    def FinalizeOptimizer(self, request, context) -> pb.OptimizerInfo:
        optimizer = self._registry.get(request.name)
        optimizer.finalize()
        return self._info(optimizer)

    def SaveOptimizer(self, request, context) -> pb.SaveOptimizerResponse:
        return pb.SaveOptimizerResponse(version=self._registry.get(request.name).save())

    def OpenSharedMemory(self, request, context) -> pb.SharedMemorySegment:
        optimizer = self._registry.get(codec.validate_name(request.optimizer, "optimizer"))
        segment = self.segments.open(optimizer, optimizer.name, optimizer.shapes, _caller(context))
        return codec.segment_to_wire(segment)

    def CloseSharedMemory(self, request, context) -> pb.CloseSharedMemoryResponse:
        self.segments.close_session(request.session, _caller(context))
        return pb.CloseSharedMemoryResponse()

    def CommitRound(self, request, context) -> pb.PushGradientsResponse:
        norms = codec.decode_norm_inputs(request)
        if norms is None:
            raise InvalidArgument("norm_inputs: required: a commit brings the other shards' sums of squares")
        return codec.push_result_to_wire(self._registry.get(request.optimizer).commit_round(request.version, norms))

    def OpenBulkChannel(self, request, context) -> pb.BulkChannel:
        if self._bulk is None:
            raise FailedPrecondition("bulk: this server has no bulk listener (--bulk-port -1); send tensor bytes "
                                     "in the gRPC stream")
        channel, ticket = self._bulk.issue()
        return pb.BulkChannel(channel=channel, ticket=ticket, port=self._bulk.port, tls=self._bulk.tls)

    def _push(self, header: pb.PushHeader, chunks: Iterator, transport: str, bulk: Transfer | None,
              context) -> pb.PushGradientsResponse:
        optimizer = self._registry.get(header.optimizer)
        try:
            # The call holds the receive buffer until the push returns; a sync round that keeps the gradients
            # retains it until the round is applied, and the last of them returns it to the pool.
            with contextlib.ExitStack() as holds:
                waits = optimizer.training_mode.mode == "sync"  # for its round
                if waits:
                    holds.enter_context(self._admission.admit("waiting", context.peer()))
                lease = holds.enter_context(self._buffers.lease("gradients"))
                measured = None
                if transport == "shared_memory":
                    grads, measured = self._segment_gradients(header, chunks, optimizer, context, lease, holds)
                else:
                    grads = codec.decode_gradients(header, chunks, optimizer.shapes, self._options.max_request_bytes,
                                                   into=lease.reserve, receive=None if bulk is None else bulk.receive,
                                                   optional=optimizer.non_trainable)
                if bulk is not None:
                    bulk.end()  # every byte is in: the channel is free for the next transfer
                self._count(optimizer.name, context, transport,
                            received=_nbytes(a for g in grads.values() for a in (g if isinstance(g, tuple) else (g,))))
                result = optimizer.push(
                    grads,
                    worker_id=header.worker_id,
                    seq=header.seq if header.HasField("seq") else None,
                    base_version=header.base_version if header.HasField("base_version") else None,
                    timeout=_wait_budget(context),
                    retain=lease.retain,
                    cancelled=self._cancellation(context, optimizer) if waits else None,
                    norms=codec.decode_norm_inputs(header),
                    measured=measured,
                )
        except OptserveError as err:  # counted per optimizer only once the optimizer is known to exist
            self._registry.metrics.refused.labels(optimizer.name, err.code.lower()).inc()
            raise
        return codec.push_result_to_wire(result)

    def _segment_gradients(self, header: pb.PushHeader, chunks: Iterator, optimizer: Optimizer,
                           context: grpc.ServicerContext, lease, holds: contextlib.ExitStack,
                           ) -> tuple[dict, dict[str, Magnitude] | None]:
        """A push's gradients from its segment: views of the segment itself where the optimizer's step may read
        it in place (`Optimizer.reads_segments_in_place`, measured by the push); else copied into `lease` first,
        so that checks, log and step see those bytes, with their magnitudes measured on that copy as it is made.

        The segment stays held (one push at a time on it) until the push returns.
        """
        if next(chunks, None) is not None:
            raise InvalidArgument("chunks: a push from shared memory is the header alone")
        segment = holds.enter_context(self.segments.use(header.shared_memory_session, optimizer, _caller(context),
                                                        "push"))
        codec.check_segment_push(header, optimizer.shapes, optimizer.non_trainable)  # before a byte is read
        if optimizer.reads_segments_in_place:
            flat, measured = segment.gradients_in_place(*optimizer.measures)
        else:
            flat, measured = segment.copy_gradients(lease.reserve, *optimizer.measures)
        views = segment.layout.views(flat)
        named = {spec.name for spec in header.gradients}  # all of them, unless `missing` is SKIP
        return ({name: view for name, view in views.items() if name in named},
                None if measured is None else {name: m for name, m in measured.items() if name in named})

    def _take_bulk(self, transfer: pb.BulkTransfer) -> Transfer:
        """The named bulk channel for this transfer; FAILED_PRECONDITION on a server without bulk channels."""
        if self._bulk is None:
            raise FailedPrecondition("bulk: this server has no bulk listener (--bulk-port -1)")
        return self._bulk.take(transfer.channel, transfer.transfer)

    def _info(self, optimizer: Optimizer) -> pb.OptimizerInfo:
        return codec.info_to_wire(optimizer.info(), self._traffic.clients(optimizer.name))

    def _count(self, optimizer: str, context: grpc.ServicerContext, transport: str, received: int = 0,
               sent: int = 0) -> None:
        """Counts tensor bytes moved, in the metrics (per transport) and in the per-client table."""
        if received:
            self._registry.metrics.bytes_received.labels(optimizer, transport).inc(received)
        if sent:
            self._registry.metrics.bytes_sent.labels(optimizer, transport).inc(sent)
        self._traffic.count(optimizer, context.peer(), transport, received, sent)

    def _cancellation(self, context: grpc.ServicerContext, optimizer: Optimizer) -> threading.Event:
        """An event set when the call ends (cancelled, its client gone), which also wakes the call's wait.

        gRPC runs the callback on its polling thread, which must not block on the
        optimizer's lock (a step may hold it): one waker thread takes it instead.
        """
        cancelled = threading.Event()

        def on_end() -> None:
            cancelled.set()
            self._waker.submit(optimizer.wake_waiters)

        if not context.add_callback(on_end):  # ended already
            cancelled.set()
        return cancelled


def _caller(context: grpc.ServicerContext) -> str:
    """A digest of who calls: the bearer token sent and the client certificate's identities (mTLS)."""
    digest = hashlib.sha256()
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            digest.update(b"token:" + (value.encode() if isinstance(value, str) else value) + b"\0")
    for identity in context.peer_identities() or ():
        digest.update(b"peer:" + identity + b"\0")
    return digest.hexdigest()


def _nbytes(arrays) -> int:
    return sum(array.nbytes for array in arrays)


def _wait_budget(context: grpc.ServicerContext) -> float:
    """Seconds a call may wait on the server: its deadline, capped."""
    return min(context.time_remaining() or MAX_WAIT_SECONDS, MAX_WAIT_SECONDS)


def add_service(servicer: OptimizerService, server: grpc.Server) -> None:
    """Registers the service with the hand-made chunk encoding of `optserve.wire`.

    The generated registration is kept for every method, but the streams of
    tensors skip protobuf's copies: received chunks are views into the
    received bytes, and a pull's messages are serialized as they are made.
    """
    capture = _HandlerCapture()
    pb_grpc.add_OptimizerServiceServicer_to_server(servicer, capture)
    handlers = dict(capture.handlers)
    for method, message in (("CreateOptimizer", pb.CreateOptimizerRequest), ("PushGradients", pb.PushGradientsRequest)):
        handlers[method] = handlers[method]._replace(request_deserializer=stream_message_parser(message))
    handlers["PullWeights"] = handlers["PullWeights"]._replace(response_serializer=bytes)  # already serialized
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class _HandlerCapture:
    """Stands in for a server to collect the generated method handlers."""

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        pass

    def add_registered_method_handlers(self, service_name: str, handlers: dict) -> None:
        self.handlers = handlers


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns domain errors into gRPC statuses for every RPC, streams included.

    It also makes every request deserializer total: a message protobuf cannot
    parse becomes an `Undecodable`, refused here with INVALID_ARGUMENT, where
    gRPC would answer INTERNAL and log a traceback.
    """

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        handler = handler._replace(request_deserializer=_total(handler.request_deserializer))
        behavior = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
        streaming = handler.request_streaming  # a unary request read as a stream (admission) is "request"
        streaming = "single" if getattr(behavior, "optserve_single_request", False) else streaming
        if handler.unary_unary:
            return handler._replace(unary_unary=_guard(handler.unary_unary, method, streaming))
        if handler.stream_unary:
            return handler._replace(stream_unary=_guard(handler.stream_unary, method, streaming))
        field = "unary_stream" if handler.unary_stream else "stream_stream"
        if getattr(behavior, "experimental_non_blocking", False):  # answers through a callback, not a generator
            return handler._replace(**{field: _guard(behavior, method, streaming)})
        return handler._replace(**{field: _guard_stream(behavior, method, streaming)})


class Undecodable:
    """A request message protobuf could not parse, with the parser's complaint."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def _total(deserializer: Callable | None) -> Callable | None:
    """`deserializer`, returning an `Undecodable` where it would raise."""
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as err:  # protobuf's DecodeError, or anything a hand-made parser raises
            return Undecodable(err)

    return deserialize


def _decoded(request, field: str):
    if isinstance(request, Undecodable):
        raise InvalidArgument(f"{field}: undecodable protobuf message ({request.error})")
    return request


def _decoded_stream(requests: Iterator, single: bool) -> Iterator:
    for index, request in enumerate(requests):
        yield _decoded(request, "request" if single else f"requests[{index}]")


def _request_of(request, streaming: bool | str):
    """The request, or an iterator of them, refusing undecodable ones; streaming "single": a stream of one."""
    return _decoded_stream(request, streaming == "single") if streaming else _decoded(request, "request")


def _abort(context: grpc.ServicerContext, err: Exception, method: str) -> None:
    if not context.is_active():  # the client cancelled or its deadline passed: nobody to tell
        log.info("%s ended early: %s", method, err)
        context.abort(grpc.StatusCode.CANCELLED, "the call ended")  # a status, not a reply to serialize
    if _out_of_memory(err):  # an allocation the request caused failed: a limit, not a bug
        err = ResourceExhausted(f"{method}: the server ran out of memory for this request ({err}); retry later")
    if isinstance(err, OptserveError):
        log.warning("refused %s: %s %s", method, err.code, err)
        context.abort_with_status(rpc_status.to_status(_status_of(err)))
    log.exception("internal error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


def _out_of_memory(err: Exception) -> bool:
    """NumPy's MemoryError, or XLA's RESOURCE_EXHAUSTED status (raised by JAX as ValueError or RuntimeError)."""
    return isinstance(err, MemoryError) or (
        isinstance(err, (ValueError, RuntimeError)) and str(err).startswith("RESOURCE_EXHAUSTED:"))


def _status_of(err: OptserveError) -> status_pb2.Status:
    """The google.rpc.Status of a domain error; INVALID_ARGUMENT carries a BadRequest naming the field."""
    code = getattr(grpc.StatusCode, err.code)
    status = status_pb2.Status(code=code.value[0], message=str(err))
    if isinstance(err, InvalidArgument):
        field, _, description = str(err).partition(": ")
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=description)]))
        status.details.append(detail)
    return status


def _guard(behavior: Callable, method: str, streaming: bool | str) -> Callable:
    def guarded(request, context, *send_response_callback):  # a non-blocking behavior also gets a callback
        try:
            return behavior(_request_of(request, streaming), context, *send_response_callback)
        except Exception as err:  # every failure leaves as a status, never a stack trace
            _abort(context, err, method)

    return _like(guarded, behavior)


def _guard_stream(behavior: Callable, method: str, streaming: bool | str) -> Callable:
    def guarded(request, context):
        try:
            yield from behavior(_request_of(request, streaming), context)
        except Exception as err:
            _abort(context, err, method)

    return _like(guarded, behavior)


def _like(wrapper: Callable, behavior: Callable) -> Callable:
    """`wrapper` with the attributes gRPC reads from a behavior (non-blocking, its thread pool)."""
    for attribute in ("experimental_non_blocking", "experimental_thread_pool"):
        if hasattr(behavior, attribute):
            setattr(wrapper, attribute, getattr(behavior, attribute))
    return wrapper
