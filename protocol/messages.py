"""Every frame tag, command and error code on the wire, in one place.

Client side follows ZeroMQ RFC 7 (Majordomo 0.1, client part):
    client -> master: [empty]["MDPC01"][service][body...]
    master -> client: [empty]["MDPC01"][service][body...]
Worker side is ringserve's own protocol, "RSW01" (see docs/protocol.md).
"""
from __future__ import annotations

MDP_CLIENT = b"MDPC01"
WORKER_PROTO = b"RSW01"
SHARD_PROTO = b"RSP01"

# Worker protocol commands (one byte, as in Majordomo).
READY = b"\x01"  # worker -> master: register (header: models, credit, device)
REQUEST = b"\x02"  # master -> worker: run one request (header + tensor frames)
REPLY = b"\x03"  # worker -> master: result or error for one request
HEARTBEAT = b"\x04"  # both ways; worker's carries its current state
DISCONNECT = b"\x05"  # both ways; "forget me" / "register again"
DRAIN = b"\x06"  # master -> worker: finish in-flight work, then leave

WORKER_COMMANDS = {READY, REQUEST, REPLY, HEARTBEAT, DISCONNECT, DRAIN}

# Parameter-server commands (msgpack header field "cmd"), see docs/protocol.md.
SHARD_COMMANDS = ("hello", "stage", "commit", "abort", "revert", "fetch", "rollback")

# Internal services a client may address instead of a model (ZeroMQ RFC 8, "mmi." namespace).
MMI_PING = "mmi.ping"  # ringserve's own: reply {"ok", "epoch"}; the client library uses it to watch the master
MMI_SERVICE = "mmi.service"  # RFC 8: body is a service name; reply is one plain frame "200" or "404"
MMI_BATCH = "mmi.batch"  # ringserve's own: several requests (or answers) in one message, see docs/protocol.md
MMI_BATCH_PACKED = "mmi.batch2"  # the same with every header packed into the first frame (issue 22)
MMI_FOUND = b"200"
MMI_NOT_FOUND = b"404"
MMI_NOT_IMPLEMENTED = b"501"  # RFC 8: any other mmi.* service


class ErrorCode:
    """Typed final answers a request can get besides a result."""

    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_MODEL = "UNKNOWN_MODEL"
    UNKNOWN_VERSION = "UNKNOWN_VERSION"
    OVERLOADED = "OVERLOADED"
    TIMEOUT = "TIMEOUT"
    WORKER_LOST = "WORKER_LOST"
    INTERNAL = "INTERNAL"
    CORRUPT = "CORRUPT"  # parameter servers only: a stored version failed its checksum
    CONFLICT = "CONFLICT"  # parameter servers only: that version number is taken by other content

    ALL = (BAD_REQUEST, UNKNOWN_MODEL, UNKNOWN_VERSION, OVERLOADED, TIMEOUT, WORKER_LOST, INTERNAL)
    RETRYABLE = (OVERLOADED, WORKER_LOST)


class ProtocolError(ValueError):
    """A message that does not follow the protocol; answered with BAD_REQUEST where possible."""


def error_body(rid: str | None, code: str, message: str, **extra) -> dict:
    """The msgpack map that carries a typed error."""
    body = {"id": rid, "ok": False, "error": {"code": code, "message": message}}
    body.update(extra)
    return body
