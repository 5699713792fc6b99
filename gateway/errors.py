"""HTTP answers for everything that is not a result: one exception type carrying status and text.

The OIP error body is ``{"error": "<text>"}``; ringserve's typed errors map to the status that
fits (the table is in docs/gateway.md), and retryable ones carry ``Retry-After``.
"""
from __future__ import annotations

import math

from ringserve.client.errors import RingserveError
from ringserve.protocol.messages import ErrorCode

RETRY_AFTER_S = 1  # when the master gave no retry_after_s (a full queue, a lost worker): a fixed hint

STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.UNKNOWN_VERSION: 404,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.WORKER_LOST: 503,
    ErrorCode.INTERNAL: 500,
}


class HttpError(Exception):
    """An answer with a status and an OIP error body; `code` is the ringserve code or a gateway reason."""

    def __init__(self, status: int, message: str, code: str = "", retry_after: int | None = None,
                 headers: tuple[tuple[bytes, bytes], ...] = ()):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after
        self.code = code or f"HTTP_{status}"
        self.headers = headers


def bad_request(message: str) -> HttpError:
    return HttpError(400, message, ErrorCode.BAD_REQUEST)


def from_ringserve(exc: RingserveError) -> HttpError:
    """A typed ringserve error -> the HTTP status that fits it (unknown codes are 500)."""
    status = STATUS.get(exc.code, 500)
    retry = None
    if exc.code in ErrorCode.RETRYABLE:  # Retry-After is whole seconds: the master's hint rounded up
        hint = getattr(exc, "retry_after_s", None)
        retry = max(1, math.ceil(hint)) if hint is not None else RETRY_AFTER_S
    return HttpError(status, f"{exc.code}: {exc.message}", exc.code, retry)
