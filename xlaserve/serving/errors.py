"""One error type for both protocols: what went wrong, mapped to a gRPC code and an HTTP status
with OpenAI's error body."""

from __future__ import annotations

import enum

import grpc

from xlaserve.engine.async_engine import EngineDeadError, EngineStoppedError
from xlaserve.engine.scheduler import QueueFullError
from xlaserve.errors import InvalidRequestError


class Kind(enum.Enum):
    # (gRPC status, HTTP status, OpenAI error type)
    INVALID = (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")
    UNAUTHENTICATED = (grpc.StatusCode.UNAUTHENTICATED, 401, "invalid_request_error")
    NOT_FOUND = (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error")
    TOO_LARGE = (grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "invalid_request_error")
    OVERLOADED = (grpc.StatusCode.RESOURCE_EXHAUSTED, 503, "server_error")
    UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, 503, "server_error")
    INTERNAL = (grpc.StatusCode.INTERNAL, 500, "server_error")

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]


class ServingError(Exception):
    """A request failed for a reason the client is told as is."""

    def __init__(self, kind: Kind, message: str, *, param: str | None = None, code=None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code

    def openai_body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind.value[2],
                "param": self.param,
                "code": self.code,
            }
        }


def classify(exc: BaseException) -> ServingError:
    """The `ServingError` a client sees for an exception raised while taking a request."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, QueueFullError):
        return ServingError(
            Kind.OVERLOADED, f"server overloaded, retry later: {exc}", code="overloaded"
        )
    if isinstance(exc, InvalidRequestError):
        return ServingError(Kind.INVALID, exc.message, param=exc.param)
    if isinstance(exc, ValueError | TypeError):
        return ServingError(Kind.INVALID, str(exc))
    if isinstance(exc, EngineStoppedError | EngineDeadError):
        return ServingError(Kind.UNAVAILABLE, str(exc), code="unavailable")
    return ServingError(Kind.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def failed_in_flight(exc: BaseException) -> ServingError:
    """The error for a request that was running when the engine failed."""
    return ServingError(Kind.INTERNAL, f"request failed: {exc}", code="engine_failed")
