"""The gateway's exceptions: one root, each class carrying the gRPC status a device receives.

    GatewayError                      (grpc INTERNAL)
    ├── Unauthenticated               no `authorization: Bearer …` metadata          (UNAUTHENTICATED)
    ├── PermissionDenied              unknown, revoked or foreign-fleet token        (PERMISSION_DENIED)
    ├── PolicyRefused                 cloud denied for the device, sensitive request (FAILED_PRECONDITION)
    ├── BudgetExceeded                device / app / fleet tokens per day used up    (RESOURCE_EXHAUSTED + retry_after)
    ├── InvalidRequest                a request the gateway cannot serve as sent     (INVALID_ARGUMENT)
    ├── DeadlineExceeded              the caller's deadline ran out                   (DEADLINE_EXCEEDED)
    ├── InternalError                 a bug in the gateway, logged; only its type shown (INTERNAL)
    └── UpstreamError                 anything the upstream model service did wrong
        ├── UpstreamRateLimited       upstream 429                                    (RESOURCE_EXHAUSTED + retry_after)
        ├── UpstreamRejected          upstream 400/404: its message, passed on        (INVALID_ARGUMENT)
        ├── UpstreamUnavailable       5xx / transport errors after retries, no key   (UNAVAILABLE)
        ├── UpstreamMalformed         an answer we cannot parse                       (UNAVAILABLE)
        └── UpstreamUnsupported       the upstream kind cannot do this call           (UNIMPLEMENTED)

Errors of google-genai and httpx are converted where they enter our code (the upstream transports), so the service
only ever sees this tree.
"""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    """Root of the gateway's errors; `code` is the gRPC status the caller gets, `str(exc)` its details."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    retryable: bool = False
    retry_after: float | None = None


class Unauthenticated(GatewayError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GatewayError):
    code = grpc.StatusCode.PERMISSION_DENIED


class PolicyRefused(GatewayError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class BudgetExceeded(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidRequest(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(GatewayError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalError(GatewayError):
    """A bug (any other exception) turned into an answer: the device sees its type, the log has its traceback."""

    @classmethod
    def about(cls, exc: BaseException) -> InternalError:
        return cls(f"internal gateway error: {type(exc).__name__} (logged)")


class UpstreamError(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE


class UpstreamRateLimited(UpstreamError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamRejected(UpstreamError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class UpstreamUnavailable(UpstreamError):
    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class UpstreamMalformed(UpstreamError):
    code = grpc.StatusCode.UNAVAILABLE


class UpstreamUnsupported(UpstreamError):
    code = grpc.StatusCode.UNIMPLEMENTED


__all__ = [
    "BudgetExceeded",
    "DeadlineExceeded",
    "GatewayError",
    "InternalError",
    "InvalidRequest",
    "PermissionDenied",
    "PolicyRefused",
    "Unauthenticated",
    "UpstreamError",
    "UpstreamMalformed",
    "UpstreamRateLimited",
    "UpstreamRejected",
    "UpstreamUnavailable",
    "UpstreamUnsupported",
]
