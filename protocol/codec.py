"""msgpack headers and raw tensor frames, decoded zero-copy.

A message body is one msgpack map (the header) followed by one raw frame per large tensor.
The header lists the tensors as ``[name, dtype, shape]`` (data in the next frame, in order)
or ``[name, dtype, shape, data]`` (a small tensor's bytes inline, as msgpack bin): a frame
costs more to send and receive than copying a few kB, and zero-copy pays only for frames
over ~64 kB, so tensors up to ``INLINE_MAX`` bytes travel inline. Tensors are never
pickled: the data is exactly ``prod(shape) * itemsize`` little-endian bytes and is turned
back into an array with ``numpy.frombuffer`` (no copy).

String tensors (dtype ``"bytes"``, OIP/Triton ``BYTES``): a tensor of byte strings of any
lengths, its data one buffer of ``prod(shape)`` strings in C order, each a 4-byte little-endian
length and then its bytes (Triton's binary layout). It travels inline or in a frame like any
other tensor (``out_of_line`` is the one rule), the buffer must be exactly the strings the
shape asks for (``check_tensors`` walks the lengths, so the master refuses what a worker
would), and it decodes to a numpy object array of ``bytes`` (a copy: strings cannot be views).
Clients may send object arrays of bytes or str (str is sent as UTF-8), numpy ``S``/``U``
arrays, or (nested) lists of bytes/str. At most ``MAX_STRINGS`` strings per tensor.
"""
from __future__ import annotations

import reprlib
import struct
import threading
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np

from ringserve.protocol.messages import ProtocolError

SUPPORTED_DTYPES = frozenset(
    ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"]
)
MAX_DIMS = 8
MAX_TENSORS = 64
MAX_NAME = 128  # characters in a tensor name
MAX_ELEMENTS = 2**40  # product of a shape's dims (zeros counted as 1)
MAX_DIM = 2**31 - 1  # one dimension; numpy's own limit is far beyond anything a frame can hold
INLINE_MAX = 16 << 10  # tensors up to this many bytes travel inside the header
BYTES = "bytes"  # the string dtype's name on the wire
MAX_STRINGS = 1 << 16  # strings in one bytes tensor: the master walks their lengths one by one
MAX_STRINGS_BYTES = 1 << 30  # bytes in one bytes tensor's buffer (lengths included)
_U32 = struct.Struct("<I")
_ITEMSIZE = {name: np.dtype(name).itemsize for name in SUPPORTED_DTYPES}
_DTYPE = {name: np.dtype(name) for name in SUPPORTED_DTYPES}  # numpy builds dtype.name anew on each read:
_NAME = {dt: name for name, dt in _DTYPE.items()}  # these lookups cost a tenth of it


_PACKERS = threading.local()  # msgpack.Packer is not thread-safe; each thread keeps its own


def pack(obj: Any) -> bytes:
    """msgpack.packb without building a Packer per call (half its cost for a request header);
    a Packer resets its buffer when a pack raises, so a failed pack never leaks into the next."""
    try:
        packer = _PACKERS.packer
    except AttributeError:
        packer = _PACKERS.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)


def pack_pairs(mapping: Mapping) -> tuple[int, bytes]:
    """A map's entries packed once: (count, key-value pairs), to be completed by `pack_map_with`.
    A msgpack map is its length and then its pairs, so a map that differs per message in one
    entry (a cached answer's id) costs one small pack instead of the whole map's."""
    return len(mapping), b"".join(pack(k) + pack(v) for k, v in mapping.items())


def pack_map_head(count: int, key: str) -> bytes:
    """The bytes a map of `count` packed pairs plus `key` starts with: its length, then `key` packed.
    `pack_map_head(count, key) + pack(value) + pairs` is `pack_map_with(count, pairs, key, value)`, so a
    caller that sends one map many times with a different value keeps the head and packs only the value."""
    n = count + 1
    head = bytes([0x80 | n]) if n <= 15 else b"\xde" + n.to_bytes(2, "big")
    return head + pack(key)


def pack_map_with(count: int, pairs: bytes, key: str, value: Any) -> bytes:
    """pack({key: value, **the map pack_pairs packed}) for a map without `key`, from its packed pairs."""
    return pack_map_head(count, key) + pack(value) + pairs


def unpack(buf) -> Any:
    """Unpack a msgpack frame; any failure becomes ProtocolError."""
    try:
        return msgpack.unpackb(buf, raw=False, strict_map_key=True)  # zmq.Frame, memoryview or bytes: no copy
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"body is not valid msgpack: {type(exc).__name__}") from None


def unpack_map(buf) -> dict:
    obj = unpack(buf)
    if not isinstance(obj, dict):
        raise ProtocolError("body must be a msgpack map")
    return obj


def encode_tensors(tensors: Mapping[str, Any], inline_max: int = INLINE_MAX) -> tuple[list, list]:
    """Named arrays (numpy or torch) -> (header meta list, frames); tensors up to `inline_max`
    bytes go inline in the meta (no frame), larger ones as zero-copy frames."""
    meta, frames = [], []
    for name, value in tensors.items():
        if type(value) is np.ndarray:  # the common case, decided without the checks below
            dtname = _NAME.get(value.dtype)  # None for object, bytes, str and unsupported dtypes
            if dtname is not None and value.flags.c_contiguous:
                if value.nbytes <= inline_max:
                    meta.append([name, dtname, list(value.shape), value.tobytes()])
                else:
                    meta.append([name, dtname, list(value.shape)])
                    frames.append(memoryview(value).cast("B"))
                continue
        if is_strings(value):
            shape, data = pack_strings(name, value)
            if len(data) <= inline_max:
                meta.append([name, BYTES, shape, data])
            else:
                meta.append([name, BYTES, shape])
                frames.append(data)
            continue
        arr = to_numpy(value)
        if arr.nbytes <= inline_max:
            meta.append([name, _NAME[arr.dtype], list(arr.shape), arr.tobytes()])
        else:
            meta.append([name, _NAME[arr.dtype], list(arr.shape)])
            frames.append(memoryview(arr).cast("B"))
    return meta, frames


def out_of_line(entry: Any) -> bool:
    """Whether a tensor entry's data travels in a frame of its own: exactly when it is
    ``[name, dtype, shape]`` (three items). A fourth item is inline data and must be bytes
    (``_check_entry`` refuses anything else, ``nil`` included). Every role counts frames with
    this one rule, so a master and a worker can never disagree on where a request ends."""
    return len(entry) == 3


def frame_count(meta: Any) -> int:
    """How many data frames a tensor list says follow (entries without inline data); -1 if malformed."""
    if type(meta) is not list:
        return -1
    n = 0
    for entry in meta:
        if type(entry) is not list and not isinstance(entry, (list, tuple)):
            return -1
        n += len(entry) == 3  # out_of_line(entry), without a call per tensor: this runs twice per request
    return n


def check_tensors(meta: Any, frames: Sequence) -> None:
    """What decode_tensors checks (names, dtypes, shapes, byte counts), without making arrays:
    for a process that only forwards the bytes (the master)."""
    if not _fast_check(meta, frames):
        _walk(meta, frames, make=False)  # the full walk: it names what is wrong (or passes an unusual form)


def _fast_count(name: Any, dtype: Any, shape: Any, nbytes: int) -> int:
    """One numeric tensor's checks for the fast paths (`_fast_check`, `_fast_walk`): its element
    count, or -1 for anything they leave to `_walk` (a bad or long name, "bytes" or an unknown
    dtype, a bad shape, a byte count that does not match); each check is `_check_entry`'s."""
    if type(name) is not str or not 0 < len(name) <= MAX_NAME or type(dtype) is not str:
        return -1
    size = _ITEMSIZE.get(dtype)  # None for "bytes" (walked by _walk) and for unknown names
    if size is None or type(shape) is not list or len(shape) > MAX_DIMS:
        return -1
    count = nonzero = 1
    for d in shape:
        if type(d) is not int or d < 0 or d > MAX_DIM:
            return -1
        count *= d
        nonzero *= d or 1
    if nonzero > MAX_ELEMENTS or nbytes != count * size:
        return -1
    return count


def _fast_check(meta: Any, frames: Sequence) -> bool:
    """`_fast_walk(meta, frames, False) is not None` without its dict of names (the master checks every
    request and every result, one or two tensors each): each check is `_fast_walk`'s, a name seen
    twice included; False sends the caller to `_walk`, which decides and words the error."""
    if type(meta) is not list or len(meta) > MAX_TENSORS:
        return False
    nframes, k = len(frames), 0
    first = names = None
    for entry in meta:
        if type(entry) is not list:
            return False
        n = len(entry)
        if n == 4:
            name, dtype, shape, buf = entry
            if type(buf) is not bytes:
                return False
        elif n == 3:
            if k >= nframes:
                return False
            name, dtype, shape = entry
            buf = frames[k]
            k += 1
        else:
            return False
        if _fast_count(name, dtype, shape, len(buf)) < 0:
            return False
        if first is None:
            first = name
        else:  # a second tensor or more: names must differ
            if names is None:
                names = {first}
            if name in names:
                return False
            names.add(name)
    return k == nframes


def is_strings(value: Any) -> bool:
    """Whether `value` is a string tensor: a numpy object, bytes or str array, bytes or str, or a
    (nested) list or tuple whose first leaf is bytes or str."""
    if type(value) is np.ndarray:
        return value.dtype.kind in "OSU"
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return isinstance(value, (bytes, str))


def wire_dtype(arr: np.ndarray) -> str:
    """The dtype name an array travels as: "bytes" for object, bytes and str arrays."""
    return BYTES if arr.dtype.kind in "OSU" else arr.dtype.name


def pack_strings(name: str, value: Any) -> tuple[list, bytes]:
    """A string tensor -> (shape, its buffer of length-prefixed strings); str elements as UTF-8."""
    if type(value) is np.ndarray:
        arr = value
    elif isinstance(value, (bytes, str)):
        arr = np.empty((), dtype=object)
        arr[()] = value
    else:
        arr = np.array(value, dtype=object)  # a ragged nested list holds lists: refused below
    if arr.size > MAX_STRINGS:
        raise ProtocolError(f"tensor {name[:64]!r}: {arr.size} strings, more than {MAX_STRINGS} in one tensor")
    out = bytearray()
    for item in arr.ravel().tolist():  # S arrays give bytes (trailing NULs stripped, as numpy does), U give str
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif isinstance(item, (bytearray, memoryview)):
            item = bytes(item)
        elif not isinstance(item, bytes):
            raise ProtocolError(f"tensor {name[:64]!r}: a string tensor's elements must be bytes or str, "
                                f"got {type(item).__name__}")
        out += _U32.pack(len(item))
        out += item
    if len(out) > MAX_STRINGS_BYTES:
        raise ProtocolError(f"tensor {name[:64]!r}: {len(out)} bytes of strings, more than {MAX_STRINGS_BYTES}")
    return list(arr.shape), bytes(out)


def _strings(name: str, buf: Any, count: int, make: bool) -> list | None:
    """Walk a string tensor's buffer: exactly `count` length-prefixed strings, nothing after them.
    Returns the strings when `make`, else only checks (the master)."""
    view = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
    n = len(view)
    if n > MAX_STRINGS_BYTES:
        raise ProtocolError(f"tensor {name!r}: {n} bytes of strings, more than {MAX_STRINGS_BYTES}")
    if n < 4 * count:
        raise ProtocolError(f"tensor {name!r}: {n} bytes cannot hold {count} length-prefixed strings")
    out = [] if make else None
    off, unpack = 0, _U32.unpack_from
    for i in range(count):
        if off + 4 > n:
            raise ProtocolError(f"tensor {name!r}: string {i} of {count} has no length (buffer ends at {n})")
        (length,) = unpack(view, off)
        start, off = off + 4, off + 4 + length
        if off > n:
            raise ProtocolError(f"tensor {name!r}: string {i} of {count} says {length} bytes, beyond the buffer's end")
        if make:
            out.append(bytes(view[start:off]))
    if off != n:
        raise ProtocolError(f"tensor {name!r}: {n - off} bytes after the {count} strings the shape asks for")
    return out


def to_numpy(value: Any) -> np.ndarray:
    """Contiguous little-endian numpy array from numpy, torch or a nested list."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.cpu().numpy()
    arr = value if type(value) is np.ndarray and value.flags.c_contiguous else np.ascontiguousarray(value)
    if arr.dtype not in _NAME:
        if arr.dtype.byteorder == ">" and arr.dtype.newbyteorder("<") in _NAME:
            return arr.astype(arr.dtype.newbyteorder("<"))
        raise ProtocolError(f"unsupported dtype {arr.dtype.name}")
    return arr


def decode_tensors(meta: Any, frames: Sequence) -> dict[str, np.ndarray]:
    """Validate meta against frames and view each tensor's bytes as an array, without copying."""
    out = _fast_walk(meta, frames, True)
    return _walk(meta, frames, make=True) if out is None else out


def _fast_walk(meta: Any, frames: Sequence, make: bool) -> dict | None:
    """The common case of `_walk` in one flat loop (it runs for every request and result in every
    role): numeric tensors described as msgpack gives them (lists), each check the same as
    `_check_entry`'s. Returns the arrays ({} when not `make`), or None for anything else (a string
    tensor, a tuple, or any check that fails), so `_walk` decides and words the error: this path
    never accepts what `_walk` refuses."""
    if type(meta) is not list or len(meta) > MAX_TENSORS:
        return None
    out: dict[str, np.ndarray] = {}
    nframes, k = len(frames), 0
    for entry in meta:
        if type(entry) is not list:
            return None
        n = len(entry)
        if n == 4:
            buf = entry[3]
            if type(buf) is not bytes:
                return None
        elif n == 3:
            if k >= nframes:
                return None
            buf = frames[k]
            k += 1
        else:
            return None
        name, dtype, shape = entry[0], entry[1], entry[2]
        count = _fast_count(name, dtype, shape, len(buf))
        if count < 0 or name in out:
            return None
        out[name] = (np.frombuffer(buf, dtype=_DTYPE[dtype]).reshape(shape) if count else np.zeros(shape, dtype)) \
            if make else None
    if k != nframes:
        return None
    return out if make else {}


def _walk(meta: Any, frames: Sequence, make: bool) -> dict[str, np.ndarray]:
    if type(meta) is not list:
        raise ProtocolError("tensor list must be an array of [name, dtype, shape]")
    if len(meta) > MAX_TENSORS:
        raise ProtocolError(f"too many tensors ({len(meta)} > {MAX_TENSORS})")
    out: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    k = 0
    for entry in meta:
        name, dtype, shape, count, inline = _check_entry(entry)
        if name in seen:
            raise ProtocolError(f"tensor {name!r} appears twice")
        seen.add(name)
        if inline is None:
            if k >= len(frames):
                raise ProtocolError(f"header lists {frame_count(meta)} tensors out of line but {len(frames)} "
                                    "data frames follow")
            buf = frames[k]  # a zmq.Frame has len() and the buffer protocol: viewed in place
            k += 1
        else:
            buf = inline
        if dtype == BYTES:
            items = _strings(name, buf, count, make)
            if make:
                arr = np.empty(count, dtype=object)
                arr[:] = items
                out[name] = arr.reshape(shape)
            continue
        expected = count * _ITEMSIZE[dtype]
        if len(buf) != expected:
            raise ProtocolError(
                f"tensor {name!r}: {len(buf)} bytes but dtype {dtype} shape {list(shape)} needs {expected}"
            )
        if make:
            out[name] = np.frombuffer(buf, dtype=_DTYPE[dtype]).reshape(shape) if expected else np.zeros(shape, dtype)
    if k != len(frames):
        raise ProtocolError(f"header lists {k} tensors out of line but {len(frames)} data frames follow")
    return out


def _check_entry(entry: Any) -> tuple[str, str, list, int, bytes | None]:
    """(name, dtype, shape, element count, inline bytes or None); plain loops, no generators: this
    runs for every tensor of every message in every role."""
    if type(entry) is not list or not 3 <= len(entry) <= 4:
        if not (isinstance(entry, (list, tuple)) and len(entry) in (3, 4)):
            raise ProtocolError("each tensor must be described as [name, dtype, shape] or [name, dtype, shape, data]")
        entry = list(entry)
    name, dtype, shape = entry[0], entry[1], entry[2]
    inline = None if out_of_line(entry) else entry[3]
    if not out_of_line(entry) and type(inline) is not bytes:
        # nil as the fourth item too: one rule (out_of_line) says where a tensor's bytes are
        raise ProtocolError("a tensor's inline data (its fourth item) must be msgpack bin (bytes); "
                            "leave it out to send the data in a frame of its own")
    if type(name) is not str or not name or len(name) > MAX_NAME:
        raise ProtocolError(f"tensor name must be a string of 1..{MAX_NAME} characters")
    if type(dtype) is not str or (dtype not in _ITEMSIZE and dtype != BYTES):  # a list or map is not hashable
        raise ProtocolError(f"tensor {name[:64]!r}: unsupported dtype {short_repr(dtype)}")
    bad = not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS
    count = nonzero = 1
    if not bad:
        for d in shape:
            if type(d) is not int or d < 0 or d > MAX_DIM:
                bad = True
                break
            count *= d
            nonzero *= d or 1
    if bad:
        raise ProtocolError(f"tensor {name[:64]!r}: shape must be a list of at most {MAX_DIMS} non-negative ints "
                            f"up to {MAX_DIM}")
    if nonzero > MAX_ELEMENTS:  # numpy refuses such a shape even when empty
        raise ProtocolError(f"tensor {name[:64]!r}: shape {list(shape)} is too large")
    if dtype == BYTES and count > MAX_STRINGS:
        raise ProtocolError(f"tensor {name[:64]!r}: shape {list(shape)} holds {count} strings, "
                            f"more than {MAX_STRINGS} in one tensor")
    return name, dtype, shape, count, inline


def short_repr(value: Any, limit: int = 80) -> str:
    """repr() for error messages about peer data: bounded in length, never recursing without end."""
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 3, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."

