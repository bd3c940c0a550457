"""The client's one exception type: every failure, on the client or the server, is an OptserveError."""

import grpc


class OptserveError(grpc.RpcError):
    """A failed call: `code()` is the grpc.StatusCode, `details()` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class InvalidArgumentError(OptserveError, ValueError):
    """A request the client refuses before sending it: code INVALID_ARGUMENT, the message names the field.

    Also a ValueError, as these refusals were before.
    """

    def __init__(self, details: str):
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, details)


def protocol_error(message: str) -> OptserveError:
    """A reply that breaks the wire protocol (too few or too many bytes): DATA_LOSS."""
    return OptserveError(grpc.StatusCode.DATA_LOSS, message)
