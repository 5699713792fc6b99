"""OIP tensors <-> numpy arrays, checked: JSON `data` (flat or nested, row-major) and raw bytes.

ringserve's wire carries nine numeric dtypes and byte strings (protocol/codec.py); the OIP
datatypes that map onto them are accepted, the others (UINT16..UINT64, BF16) are a clear 400
naming what is carried. BYTES: JSON strings (UTF-8), or in binary the layout Triton uses and
ringserve's wire uses too (each element a 4-byte little-endian length and its bytes), decoded
to a numpy object array of bytes; an output that is not UTF-8 goes as binary data even when
JSON was asked (JSON strings cannot hold arbitrary bytes).
JSON values are not coerced across kinds: a string, a fraction for an integer type, a number
for BOOL or a value out of the type's range is refused rather than silently changed.
Raw bytes (the binary tensor data extension) are viewed in place with ``numpy.frombuffer``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ringserve.gateway.errors import bad_request
from ringserve.protocol.codec import MAX_DIM, MAX_DIMS, MAX_ELEMENTS, _strings, pack_strings
from ringserve.protocol.messages import ProtocolError

TO_NUMPY = {
    "BOOL": np.dtype("bool"), "UINT8": np.dtype("uint8"), "INT8": np.dtype("int8"),
    "INT16": np.dtype("int16"), "INT32": np.dtype("int32"), "INT64": np.dtype("int64"),
    "FP16": np.dtype("float16"), "FP32": np.dtype("float32"), "FP64": np.dtype("float64"),
}
TO_OIP = {dt: name for name, dt in TO_NUMPY.items()}
NOT_CARRIED = {"UINT16", "UINT32", "UINT64", "BF16"}  # valid OIP, but ringserve's wire has no such dtype
STRINGS = np.dtype(object)  # BYTES: an object array of bytes
CARRIED = ", ".join([*TO_NUMPY, "BYTES"])
# JSON element kinds (numpy's inferred dtype.kind) each target kind accepts without losing meaning
_ACCEPTS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}


def numpy_dtype(datatype: Any, what: str) -> np.dtype:
    """The numpy dtype for an OIP datatype string, or a 400 that says why not."""
    dt = TO_NUMPY.get(datatype) if isinstance(datatype, str) else None
    if dt is not None:
        return dt
    if datatype == "BYTES":
        return STRINGS
    if datatype in NOT_CARRIED:
        raise bad_request(f"{what}: datatype {datatype} cannot be carried by ringserve; use one of {CARRIED}")
    raise bad_request(f"{what}: unknown datatype {str(datatype)[:32]!r}; use one of {CARRIED}")


def check_shape(shape: Any, what: str) -> tuple[int, ...]:
    """A shape as OIP sends it: a list of at most MAX_DIMS non-negative ints, bounded in size."""
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise bad_request(f"{what}: shape must be a list of at most {MAX_DIMS} non-negative integers")
    nonzero = 1
    for d in shape:
        if type(d) is not int or not 0 <= d <= MAX_DIM:
            raise bad_request(f"{what}: shape must be a list of at most {MAX_DIMS} non-negative integers, "
                              f"got {str(shape)[:80]}")
        nonzero *= d or 1
    if nonzero > MAX_ELEMENTS:
        raise bad_request(f"{what}: shape {shape} is too large")
    return tuple(shape)


def from_json(data: Any, shape: tuple[int, ...], dt: np.dtype, what: str) -> np.ndarray:
    """JSON `data` (flat or nested) -> an array of `shape` and `dt`; 400 on any mismatch."""
    count = math.prod(shape)
    if dt is STRINGS:
        return _strings_from_json(data, shape, count, what)
    if not isinstance(data, list):
        if shape == () and isinstance(data, (int, float, bool)):
            data = [data]
        else:
            raise bad_request(f"{what}: data must be a JSON array (flat or nested)")
    try:
        arr = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise bad_request(f"{what}: data is not a regular (rectangular) array of numbers") from None
    if arr.size != count:
        raise bad_request(f"{what}: shape {list(shape)} needs {count} elements, data has {arr.size}")
    kind = arr.dtype.kind
    if count and kind not in _ACCEPTS[dt.kind]:
        got = {"U": "strings", "O": "mixed or out-of-range values", "b": "booleans", "f": "fractional numbers"}
        raise bad_request(f"{what}: datatype {TO_OIP[dt]} cannot take {got.get(kind, kind)} in data")
    if count and dt.kind in "iu" and kind in "iu":
        info = np.iinfo(dt)
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            raise bad_request(f"{what}: value out of range for {TO_OIP[dt]} ({info.min}..{info.max})")
    return arr.astype(dt, copy=False).reshape(shape)


def from_bytes(buf: memoryview, shape: tuple[int, ...], dt: np.dtype, what: str) -> np.ndarray:
    """Raw little-endian bytes -> an array viewing them (no copy); 400 when the size is wrong."""
    count = math.prod(shape)
    if dt is STRINGS:
        try:
            items = _strings(what, buf, count, True)
        except ProtocolError as exc:
            raise bad_request(f"{what}: BYTES data: {exc}") from None
        return strings_array(items, shape)
    need = count * dt.itemsize
    if len(buf) != need:
        raise bad_request(f"{what}: binary_data_size is {len(buf)} but datatype {TO_OIP[dt]} shape "
                          f"{list(shape)} needs {need} bytes")
    if dt.kind == "b" and need and np.frombuffer(buf, np.uint8).max() > 1:
        raise bad_request(f"{what}: BOOL bytes must be 0 or 1")
    return np.frombuffer(buf, dt).reshape(shape)


def oip_datatype(arr: np.ndarray) -> str:
    """The OIP datatype of an output array (the worker's wire dtypes all have one)."""
    return TO_OIP.get(arr.dtype, "BYTES")


def strings_array(items: list, shape: tuple[int, ...]) -> np.ndarray:
    """Byte strings -> an object array of `shape` (numpy would make a fixed-width S array of a list)."""
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr.reshape(shape)


def _strings_from_json(data: Any, shape: tuple[int, ...], count: int, what: str) -> np.ndarray:
    """JSON strings (flat or nested) -> an object array of their UTF-8 bytes."""
    flat: list = []
    stack = [data] if isinstance(data, list) else None
    if stack is None:
        if shape == () and isinstance(data, str):
            flat = [data]
        else:
            raise bad_request(f"{what}: data must be a JSON array of strings (flat or nested)")
    while stack:  # depth-first, in order, bounded by the element count
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            flat.append(item)
            if len(flat) > count:
                break
        else:
            raise bad_request(f"{what}: datatype BYTES takes strings in data, got {type(item).__name__}")
    if len(flat) != count:
        raise bad_request(f"{what}: shape {list(shape)} needs {count} elements, data has {len(flat)}"
                          + (" or more" if len(flat) > count else ""))
    return strings_array([s.encode("utf-8") for s in flat], shape)


def strings_buffer(arr: np.ndarray, what: str) -> bytes:
    """An object array of bytes -> the 4-byte-length layout (binary outputs, raw gRPC contents)."""
    return pack_strings(what, arr)[1]


def strings_as_json(arr: np.ndarray) -> list | None:
    """The strings as JSON text, flat; None when one of them is not UTF-8 (send it as binary)."""
    try:
        return [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in arr.reshape(-1).tolist()]
    except UnicodeDecodeError:
        return None
