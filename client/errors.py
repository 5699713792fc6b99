"""One exception class per error code on the wire."""
from __future__ import annotations

from ringserve.protocol.messages import ErrorCode


class RingserveError(Exception):
    code = ErrorCode.INTERNAL

    @property
    def retryable(self) -> bool:
        """Worth sending again later (the protocol's list: OVERLOADED, WORKER_LOST)."""
        return self.code in ErrorCode.RETRYABLE

    def __init__(self, message: str, request_id: str | None = None, retry_after_s: float | None = None):
        super().__init__(f"{self.code}: {message}")
        self.message, self.request_id = message, request_id
        self.retry_after_s = retry_after_s  # the master's hint for a rate-limited request, else None


class BadRequest(RingserveError):
    code = ErrorCode.BAD_REQUEST


class UnknownModel(RingserveError):
    code = ErrorCode.UNKNOWN_MODEL


class UnknownVersion(RingserveError):
    code = ErrorCode.UNKNOWN_VERSION


class Overloaded(RingserveError):
    """The master's queue for the model is full: back off and retry."""

    code = ErrorCode.OVERLOADED


class Timeout(RingserveError):
    code = ErrorCode.TIMEOUT


class WorkerLost(RingserveError):
    code = ErrorCode.WORKER_LOST


class Internal(RingserveError):
    code = ErrorCode.INTERNAL


class Conflict(RingserveError):
    """Publishing: that version number is already taken by other content (another publisher won)."""

    code = ErrorCode.CONFLICT


class ConfigError(RingserveError):
    """The client cannot be set up as given (its keys, the master's key, the address): raised by
    the constructor in the caller's thread, never a wire code."""

    code = "CONFIG"


BY_CODE = {cls.code: cls for cls in (BadRequest, UnknownModel, UnknownVersion, Overloaded, Timeout, WorkerLost,
                                     Internal, Conflict)}


def from_error(error: dict | None, request_id: str | None, retry_after: object = None) -> RingserveError:
    """A reply's error map -> its typed exception (with the master's retry_after_s when it is a sane number)."""
    retry_after_s = (float(retry_after) if isinstance(retry_after, (int, float)) and not isinstance(retry_after, bool)
                     and 0 <= retry_after <= 3600 else None)
    error = error if isinstance(error, dict) else {}
    cls = BY_CODE.get(error.get("code"), Internal)
    return cls(str(error.get("message", "no message")), request_id, retry_after_s)
