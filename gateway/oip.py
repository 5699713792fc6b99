"""The OIP inference request and response bodies, with Triton's binary tensor data extension.

A request body is a JSON header, optionally followed by raw tensor bytes: the header's length is
then in ``Inference-Header-Content-Length`` and each binary input says its size in
``parameters.binary_data_size`` (inputs' bytes follow in the order the inputs are listed).
Every field is checked before anything is sent on; a mistake is a 400 that names it.

A response is JSON, or JSON plus raw output bytes when the request asked for binary outputs
(``parameters.binary_data_output`` for all, ``outputs[i].parameters.binary_data`` for one).
Once an all-binary answer's header has been built for a form (model, version, outputs asked for,
each output's name, dtype and shape), the next answers of that form are written from the reply's
checked buffers with no arrays made (``raw_response``; the same bytes as ``build_response``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from ringserve.gateway.errors import bad_request
from ringserve.gateway.tensors import (
    STRINGS, check_shape, from_bytes, from_json, numpy_dtype, oip_datatype, strings_as_json, strings_buffer,
)
from ringserve.protocol.codec import MAX_NAME, MAX_TENSORS

MAX_TAGS = 16  # protocol/envelope.py's bounds on a request's tags map
MAX_TAG_LEN = 256
MAX_ID = 256  # characters of an OIP request id echoed back
RESERVED = {"binary_data_output", "timeout", "priority", "headers"}  # request parameters OIP clients use
UNSUPPORTED = {"sequence_id", "sequence_start", "sequence_end"}  # Triton's sequence batching


@dataclass(slots=True)  # one per request: slots make it quicker to build and read
class InferCall:
    """A checked inference request, ready for AsyncClient.submit."""

    inputs: dict[str, np.ndarray]
    request_id: str | None = None  # the OIP "id", echoed in the response
    outputs: list[tuple[str, bool | None]] | None = None  # requested outputs (name, binary or None: default)
    binary_output: bool = False  # binary_data_output: every output binary unless it says otherwise
    timeout_s: float | None = None  # Triton's "timeout" parameter (microseconds)
    tags: dict[str, str] = field(default_factory=dict)  # the other parameters, for the master's routes
    plan: Any = None  # the checked header it came from (the same object for the same header bytes)


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise bad_request(f"{what}: 'name' must be a string of 1..{MAX_NAME} characters")
    return value


def _params(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{what}: 'parameters' must be a JSON object")
    return value


def _tag(key: str, value: Any) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, (int, float)):
        value = repr(value)
    if not isinstance(value, str):
        raise bad_request(f"parameter {key[:64]!r}: a value must be a string, number or boolean")
    if len(key) > MAX_TAG_LEN or len(value) > MAX_TAG_LEN:
        raise bad_request(f"parameter {key[:64]!r}: names and values are at most {MAX_TAG_LEN} characters")
    return value


PLAN_CACHE = 1024  # JSON headers remembered (binary requests): clients send the same header again and again
PLAN_HEAD_MAX = 4096  # bytes: longer headers are parsed every time


@dataclass(frozen=True)
class _Input:
    name: str
    what: str
    dtype: np.dtype
    shape: tuple[int, ...]
    size: int | None  # binary_data_size, or None: `data` holds the values
    data: Any = None
    need: int | None = None  # the bytes dtype and shape take (numbers), None for BYTES: checked per request


@dataclass(frozen=True)
class _Plan:
    """What a JSON header says, checked; the same header bytes give the same plan, so a binary
    request whose header was seen before skips the JSON parse and the checks (only the tail's
    sizes are checked again, against the bytes that came)."""

    request_id: str | None
    binary_output: bool
    timeout_s: float | None
    tags: dict[str, str]  # never mutated: merged into a new dict per request
    inputs: tuple[_Input, ...]
    outputs: list[tuple[str, bool | None]] | None
    rows: int = 1  # the first input's first dimension (the metrics' inference count)


_plans: dict[bytes, _Plan] = {}


def parse_infer(body: memoryview, header_length: int | None, extra_tags: dict[str, str] | None = None) -> InferCall:
    """The request body (JSON header + binary tail) -> an InferCall; raises HttpError 400."""
    if header_length is None:
        head, tail = body, body[len(body):]
    else:
        if not 0 < header_length <= len(body):
            raise bad_request(f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes")
        head, tail = body[:header_length], body[header_length:]
    key = bytes(head) if header_length is not None and header_length <= PLAN_HEAD_MAX else None
    plan = _plans.get(key) if key is not None else None
    if plan is None:
        plan = _plan(head)
        if key is not None and all(i.size is not None for i in plan.inputs):
            if len(_plans) >= PLAN_CACHE:
                _plans.clear()
            _plans[key] = plan
    return _bind(plan, tail, extra_tags)


def _plan(head: memoryview) -> _Plan:
    try:
        req = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(req, dict):
        raise bad_request("request body must be a JSON object with 'inputs'")
    rid = req.get("id")
    if rid is not None and (not isinstance(rid, str) or len(rid) > MAX_ID):
        raise bad_request(f"'id' must be a string of at most {MAX_ID} characters")
    params = InferCall({})
    apply_parameters(params, _params(req.get("parameters"), "request"), {})
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not 0 < len(inputs) <= MAX_TENSORS:
        raise bad_request(f"'inputs' must be a list of 1..{MAX_TENSORS} tensors")
    planned: list[_Input] = []
    names: set[str] = set()
    for k, entry in enumerate(inputs):
        what = f"input {k}"
        if not isinstance(entry, dict):
            raise bad_request(f"{what} must be a JSON object")
        name = _name(entry.get("name"), what)
        what = f"input {name[:64]!r}"
        if name in names:
            raise bad_request(f"{what} appears twice")
        names.add(name)
        dt = numpy_dtype(entry.get("datatype"), what)
        shape = check_shape(entry.get("shape"), what)
        size = _params(entry.get("parameters"), what).get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise bad_request(f"{what}: binary_data_size must be a non-negative integer")
            if "data" in entry:
                raise bad_request(f"{what}: has both 'data' and binary_data_size")
            planned.append(_Input(name, what, dt, shape, size, None,
                                  None if dt is STRINGS else math.prod(shape) * dt.itemsize))
        elif "data" not in entry:
            raise bad_request(f"{what}: needs 'data' (or binary_data_size with the bytes after the header)")
        else:
            planned.append(_Input(name, what, dt, shape, None, entry["data"]))
    first = planned[0].shape
    return _Plan(rid, params.binary_output, params.timeout_s, params.tags, tuple(planned),
                 _requested_outputs(req.get("outputs")), first[0] if first else 1)


def _bind(plan: _Plan, tail: memoryview, extra_tags: dict[str, str] | None) -> InferCall:
    """A plan and this request's bytes and tag headers -> its InferCall."""
    tags = plan.tags
    if extra_tags:
        tags = {**tags, **extra_tags}
        if len(tags) > MAX_TAGS:
            raise bad_request(f"at most {MAX_TAGS} request parameters (and tag headers) are passed on, got {len(tags)}")
    else:
        tags = dict(tags)
    inputs: dict[str, np.ndarray] = {}
    call = InferCall(inputs, plan.request_id, plan.outputs, plan.binary_output, plan.timeout_s, tags, plan)
    offset = 0
    for i in plan.inputs:
        size = i.size
        if size is None:
            inputs[i.name] = from_json(i.data, i.shape, i.dtype, i.what)
            continue
        if offset + size > len(tail):
            raise bad_request(f"{i.what}: binary_data_size {size} runs past the end of the body "
                              f"({len(tail)} bytes follow the JSON header)")
        if size == i.need and i.dtype.kind != "b":  # numbers of the right size: a view of the body, in place
            inputs[i.name] = np.ndarray(i.shape, i.dtype, tail, offset)
        else:  # BYTES, BOOL (values checked) or a wrong size (its 400): from_bytes decides
            inputs[i.name] = from_bytes(tail[offset:offset + size], i.shape, i.dtype, i.what)
        offset += size
    if offset != len(tail):
        raise bad_request(f"{len(tail)} bytes follow the JSON header but the inputs' binary_data_size add up "
                          f"to {offset}")
    return call


def apply_parameters(call: InferCall, params: dict, extra_tags: dict[str, str]) -> None:
    """binary_data_output, timeout (microseconds, as Triton), and the rest as tags for the master's routes."""
    binary = params.get("binary_data_output", False)
    if not isinstance(binary, bool):
        raise bad_request("parameter 'binary_data_output' must be true or false")
    call.binary_output = binary
    timeout = params.get("timeout")
    if timeout is not None:
        if type(timeout) is not int or timeout <= 0:
            raise bad_request("parameter 'timeout' must be a positive integer (microseconds)")
        call.timeout_s = timeout / 1e6
    bad = UNSUPPORTED.intersection(params)
    if bad:
        raise bad_request(f"parameters {sorted(bad)}: sequence batching is not supported")
    tags = {k: _tag(k, v) for k, v in params.items() if k not in RESERVED}
    tags.update(extra_tags)
    if len(tags) > MAX_TAGS:
        raise bad_request(f"at most {MAX_TAGS} request parameters (and tag headers) are passed on, got {len(tags)}")
    call.tags = tags


def _requested_outputs(outputs: Any) -> list[tuple[str, bool | None]] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or len(outputs) > MAX_TENSORS:
        raise bad_request(f"'outputs' must be a list of at most {MAX_TENSORS} objects")
    wanted = []
    for k, entry in enumerate(outputs):
        if not isinstance(entry, dict):
            raise bad_request(f"output {k} must be a JSON object")
        name = _name(entry.get("name"), f"output {k}")
        params = _params(entry.get("parameters"), f"output {name[:64]!r}")
        if params.get("classification"):
            raise bad_request(f"output {name[:64]!r}: the classification extension is not supported")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise bad_request(f"output {name[:64]!r}: binary_data must be true or false")
        wanted.append((name, binary))
    return wanted


COPY_BELOW = 4096  # bytes: a smaller output is copied out (one call), a larger one viewed in place


def _raw(arr: np.ndarray):
    """An output's bytes as the response carries them (row-major)."""
    if arr.nbytes < COPY_BELOW:
        return arr.tobytes()
    return memoryview(np.ascontiguousarray(arr)).cast("B")


HEAD_CACHE = 1024  # response headers remembered: all-binary answers of one model look alike
_heads: dict[tuple, tuple[bytes, tuple[str, ...]]] = {}


def build_response(model: str, version: int | None, call: InferCall,
                   outputs: dict[str, np.ndarray]) -> tuple[bytes, list, int | None]:
    """(JSON header, raw output buffers, header length or None when the body is JSON alone).

    When every output goes as binary numbers and the request has no id, the header is decided by
    the model, version, the outputs asked for and each output's name, dtype and shape alone: such
    a header is built once and reused (bounded cache), and only the buffers are this request's."""
    key = None
    if call.request_id is None:
        key = (model, version, call.binary_output, None if call.outputs is None else tuple(call.outputs),
               tuple([(name, arr.dtype, arr.shape) for name, arr in outputs.items()]))
        hit = _heads.get(key)
        if hit is not None:
            head, names = hit
            return head, [_raw(outputs[n]) for n in names], len(head)
    if call.outputs is None:
        chosen = [(name, call.binary_output) for name in outputs]
    else:
        chosen = []
        for name, binary in call.outputs:
            if name not in outputs:
                raise bad_request(f"model {model!r} has no output {name[:64]!r} (outputs: {sorted(outputs)})")
            chosen.append((name, call.binary_output if binary is None else binary))
    entries, raw = [], []
    reusable = True  # every output binary numbers: the header says only names, dtypes and shapes
    for name, binary in chosen:
        arr = outputs[name]
        entry = {"name": name, "datatype": oip_datatype(arr), "shape": list(arr.shape)}
        text = strings_as_json(arr) if arr.dtype == STRINGS and not binary else None
        if arr.dtype == STRINGS and not binary and text is None:
            binary = True  # bytes that are not UTF-8: JSON strings cannot carry them
        if binary:
            buf = memoryview(strings_buffer(arr, name)) if arr.dtype == STRINGS else _raw(arr)
            entry["parameters"] = {"binary_data_size": len(buf)}
            raw.append(buf)
        else:
            entry["data"] = text if text is not None else arr.reshape(-1)
        reusable = reusable and binary and arr.dtype != STRINGS
        entries.append(entry)
    resp: dict[str, Any] = {"model_name": model}
    if version is not None:
        resp["model_version"] = str(version)
    if call.request_id is not None:
        resp["id"] = call.request_id
    resp["outputs"] = entries
    head = orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)
    if key is not None and reusable and raw:
        if len(_heads) >= HEAD_CACHE:
            _heads.clear()
        _heads[key] = (head, tuple(name for name, _ in chosen))
    return head, raw, (len(head) if raw else None)


# An all-binary answer's response from the reply's checked buffers (client Reply.raw), no arrays made:
# keyed by what decides the header (as _heads) with the tensors' wire description in place of the
# arrays' dtype and shape; the value says which buffer each output's bytes are.
_raw_heads: dict[tuple, tuple[bytes, bytes, tuple[tuple[bool, int], ...]]] = {}


def _raw_key(model: str, version: int | None, call: InferCall, meta: list) -> tuple:
    sig = tuple([(e[0], e[1], tuple(e[2]), len(e)) for e in meta])
    return model, version, call.binary_output, None if call.outputs is None else tuple(call.outputs), sig


def raw_response(model: str, version: int | None, call: InferCall, meta: list,
                 frames) -> tuple[bytes, list, bytes] | None:
    """(JSON header, body parts: the header then each output's bytes as they arrived, the header's
    length as ASCII) for an answer whose response of the same form was built before by
    build_response (its header reused: no id, every output binary numbers); None otherwise (build
    it with build_response from the arrays). `meta` and `frames` are checked already (the client's)."""
    if call.request_id is not None:
        return None
    hit = _raw_heads.get(_raw_key(model, version, call, meta))
    if hit is None:
        return None
    head, hlen, picks = hit
    parts = [head]
    for inline, k in picks:
        parts.append(meta[k][3] if inline else memoryview(frames[k]).cast("B"))
    return head, parts, hlen


def remember_raw(model: str, version: int | None, call: InferCall, meta: list, outputs: dict[str, np.ndarray],
                 head: bytes) -> None:
    """After build_response answered the reply that `meta` describes with `head`: keep it for
    raw_response when it is a reused all-binary header (so the same form is answered from the buffers)."""
    if call.request_id is not None or len(meta) != len(outputs):
        return
    hit = _heads.get((model, version, call.binary_output, None if call.outputs is None else tuple(call.outputs),
                      tuple([(name, arr.dtype, arr.shape) for name, arr in outputs.items()])))
    if hit is None or hit[0] is not head:
        return
    where: dict[str, tuple[bool, int]] = {}
    frame = 0
    for k, e in enumerate(meta):
        if len(e) == 4:
            where[e[0]] = (True, k)
        else:
            where[e[0]] = (False, frame)
            frame += 1
    if len(where) != len(meta) or not all(name in where for name in hit[1]):
        return
    if len(_raw_heads) >= HEAD_CACHE:
        _raw_heads.clear()
    _raw_heads[_raw_key(model, version, call, meta)] = (head, str(len(head)).encode(),
                                                        tuple([where[name] for name in hit[1]]))
