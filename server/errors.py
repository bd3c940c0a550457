"""Domain errors of the server, each tied to the gRPC status code it becomes.

The engine, the registry and the codec raise these; one interceptor in
`service.py` turns them into statuses, so no other module imports grpc for
errors. Messages name the offending field, e.g. ``gradients['w'].shape``.
"""


class OptserveError(Exception):
    """Base class; `code` is the name of a `grpc.StatusCode` member."""

    code = "INTERNAL"


class InvalidArgument(OptserveError):
    """The request itself is malformed or out of range."""

    code = "INVALID_ARGUMENT"


class NotFound(OptserveError):
    """An optimizer or tensor named by the request does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(OptserveError):
    """An optimizer of that name exists already."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(OptserveError):
    """The request is well formed but the optimizer's settings forbid it."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(OptserveError):
    """The request would exceed a server limit."""

    code = "RESOURCE_EXHAUSTED"


class Aborted(OptserveError):
    """The push lost a race with the optimizer's progress (stale, or its round closed); retry fresh."""

    code = "ABORTED"


class DeadlineExceeded(OptserveError):
    """A wait (a pull's min_version) ran out of time."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(OptserveError):
    """The call ended (its client cancelled or went away) while it waited; nobody hears the answer."""

    code = "CANCELLED"


class Unavailable(OptserveError):
    """The server cannot take calls yet (it is restoring its state); retry shortly."""

    code = "UNAVAILABLE"
