"""The one exception hierarchy of vgate, and the one place it becomes an OpenAI error body.

    VgateError                      500 server_error
    ├── InvalidRequest              400 invalid_request_error
    │   ├── ContextLengthExceeded   400 code=context_length_exceeded
    │   └── MalformedHTTP           400 (framing; the connection is closed)
    ├── AuthenticationFailed        401 code=invalid_api_key
    ├── PermissionDenied            403
    ├── NotFound                    404 code=unknown_url
    │   └── ModelNotFound           404 code=model_not_found
    ├── MethodNotAllowed            405
    ├── RequestTimeout              408 (head or body trickled in too slowly; connection closed)
    ├── PayloadTooLarge             413
    ├── HeadersTooLarge             431 (request head over its size or count; connection closed)
    ├── RateLimited                 429 code=rate_limit_exceeded (+ Retry-After, x-ratelimit-*)
    ├── Overloaded                  503 code=overloaded (+ Retry-After)
    └── UpstreamError               502 upstream_error
        ├── UpstreamUnreachable     502 code=upstream_unreachable
        ├── UpstreamTimeout         504 code=upstream_timeout
        ├── UpstreamServerError     502 code=upstream_server_error (5xx body replaced)
        ├── CircuitOpen             503 code=upstream_circuit_open (+ Retry-After; not tried)
        └── UpstreamStreamBroken    502 code=upstream_stream_broken (after the first byte)

Every error a client can see is one of these. How one looks on the wire (an OpenAI or an
Anthropic body, or the terminal event of a stream that already started) is decided in one
place: proxy.http.writer.
"""

from __future__ import annotations

from collections.abc import Mapping


class VgateError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = dict(headers or {})


class InvalidRequest(VgateError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class MalformedHTTP(InvalidRequest):
    code = "malformed_request"


class AuthenticationFailed(VgateError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(VgateError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(VgateError):
    status = 404
    type = "invalid_request_error"
    code = "unknown_url"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(VgateError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(VgateError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(VgateError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(VgateError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class RateLimited(VgateError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Overloaded(VgateError):
    status = 503
    type = "server_error"
    code = "overloaded"


class ShuttingDown(VgateError):
    """The drain timeout ended while the request was still running (SIGTERM)."""

    status = 503
    type = "server_error"
    code = "shutting_down"


class UpstreamError(VgateError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamServerError(UpstreamError):
    code = "upstream_server_error"


class CircuitOpen(UpstreamError):
    """Every upstream that could serve is behind an open circuit breaker: none was tried."""

    status = 503
    code = "upstream_circuit_open"


class UpstreamStreamBroken(UpstreamError):
    code = "upstream_stream_broken"
