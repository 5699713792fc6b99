"""Building and parsing the msgpack headers of client and worker messages.

One function per message kind, so the master, the worker, the client and the tests all
read the same fields the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ringserve.protocol.codec import decode_tensors, encode_tensors, pack, unpack_map
from ringserve.protocol.messages import MDP_CLIENT, ProtocolError

MAX_ID_LEN = 128
MAX_TAGS = 16  # request tags: small str -> str map used for routing (e.g. a sticky user id)
MAX_TAG_LEN = 256


@dataclass
class ClientRequest:
    """A validated client request header (tensor frames kept aside, undecoded)."""

    rid: str
    inputs: list
    version: int | None
    timeout_ms: float | None
    ack: bool
    tags: dict | None = None


def request_body(rid: str, inputs: Mapping[str, Any], version: int | None = None,
                 timeout_ms: float | None = None, ack: bool = False, tags: Mapping[str, str] | None = None) -> list:
    """Body frames of a client request: msgpack header then one raw frame per tensor."""
    meta, frames = encode_tensors(inputs)
    header = {"id": rid, "inputs": meta}
    if version is not None:
        header["version"] = version
    if timeout_ms is not None:
        header["timeout_ms"] = float(timeout_ms)
    if ack:
        header["ack"] = True
    if tags:
        header["tags"] = dict(tags)
    return [pack(header), *frames]


def client_frames(service: str | bytes, body: Sequence) -> list:
    """RFC 7 client framing around a body: [empty][MDPC01][service][body...]."""
    svc = service.encode() if isinstance(service, str) else service
    return [b"", MDP_CLIENT, svc, *body]


def parse_request_header(header: dict, frames: Sequence) -> ClientRequest:
    """Check every field of a client request; raise ProtocolError naming the bad one."""
    rid = header.get("id")
    if not isinstance(rid, str) or not rid or len(rid) > MAX_ID_LEN:
        raise ProtocolError(f"field 'id' must be a string of 1..{MAX_ID_LEN} characters")
    if "inputs" not in header:
        raise ProtocolError("missing field 'inputs'")
    decode_tensors(header["inputs"], frames)  # validates byte lengths; views are discarded
    version = header.get("version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 0):
        raise ProtocolError("field 'version' must be a non-negative integer")
    timeout_ms = header.get("timeout_ms")
    if timeout_ms is not None and (not isinstance(timeout_ms, (int, float)) or isinstance(timeout_ms, bool)
                                   or not timeout_ms > 0):
        raise ProtocolError("field 'timeout_ms' must be a positive number")
    tags = header.get("tags")
    if tags is not None and not (isinstance(tags, dict) and len(tags) <= MAX_TAGS and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_TAG_LEN and len(v) <= MAX_TAG_LEN
            for k, v in tags.items())):
        raise ProtocolError(f"field 'tags' must map at most {MAX_TAGS} strings to strings of <= {MAX_TAG_LEN} chars")
    return ClientRequest(rid, header["inputs"], version, timeout_ms, bool(header.get("ack", False)), tags)


def parse_reply(body: Sequence) -> tuple[dict, dict]:
    """A reply body (header + frames) -> (header, outputs as numpy arrays)."""
    if not body:
        raise ProtocolError("empty reply")
    header = unpack_map(body[0])
    outputs = decode_tensors(header.get("outputs", []), body[1:]) if header.get("ok") else {}
    return header, outputs
