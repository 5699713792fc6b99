"""Building and parsing the msgpack headers of client and worker messages.

One function per message kind, so the master, the worker, the client and the tests all
read the same fields the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import itertools
import math

import msgspec

from ringserve.protocol.codec import (
    check_tensors, decode_tensors, encode_tensors, frame_count, pack, short_repr, unpack, unpack_map,
)
from ringserve.protocol import fastcheck
from ringserve.protocol.messages import MDP_CLIENT, ErrorCode, ProtocolError

MAX_ID_LEN = 128
MAX_NAME_LEN = 128  # worker and model names
MAX_MODELS = 256  # models one worker may announce
MAX_CREDIT = 100_000
MAX_WEIGHT = 1e6
MAX_STATS = 64  # entries of a worker's stats map the master keeps
MAX_TEXT = 1000  # characters of an error message passed on
MAX_INT = 2**63 - 1
MAX_HELD_VERSIONS = 16  # versions of one model a worker may hold side by side
MAX_TAGS = 16  # request tags: small str -> str map used for routing (e.g. a sticky user id)
MAX_TAG_LEN = 256
MAX_PER_MESSAGE = 4096  # requests in one master -> worker REQUEST (or replies in one REPLY)
# The worker hop's framing (issue 22): 1, every request and reply header a frame of its own; 2, the
# headers of one REQUEST or REPLY packed together in its first frame (see dispatch_frames_packed and
# packed_reply_frames). A worker says which it reads in READY ("framing"), a master in its HEARTBEAT;
# each side sends the packed form only to a peer that said 2, and reads both forms from anyone.
FRAMING = 2
MAX_PACKED_BYTES = 4 << 20  # header bytes packed into one frame; beyond it the sender starts a new message
# Fields a worker's result header may hold for the master to forward it to the client unchanged
# (an error reply is always re-packed from its checked fields).
REPLY_FIELDS = frozenset(["id", "key", "attempt", "ok", "model", "version", "batch_rows", "outputs", "worker",
                          "epoch", "timing"])
# A result's optional "timing" map: where the worker spent the request's time, in milliseconds
# (preprocess_ms, queue_ms, compute_ms, postprocess_ms): short names, finite numbers, few of them.
MAX_TIMING = 8
MAX_TIMING_KEY = 32
MAX_TIMING_MS = 1e9
# protocol/fastcheck.py (the compiled accept paths) spells these bounds in its types: one value each
assert (fastcheck._MAX_ID_LEN, fastcheck._MAX_NAME_LEN, fastcheck._MAX_INT, fastcheck._MAX_TAGS, fastcheck._MAX_TAG_LEN,
        fastcheck._MAX_TIMING, fastcheck._MAX_TIMING_KEY, fastcheck._MAX_TIMING_MS) == (
    MAX_ID_LEN, MAX_NAME_LEN, MAX_INT, MAX_TAGS, MAX_TAG_LEN, MAX_TIMING, MAX_TIMING_KEY, MAX_TIMING_MS)
assert set(fastcheck._Result.__struct_fields__) == REPLY_FIELDS
# What our own code builds and sends is packed by msgspec's encoder: the same msgpack bytes codec.pack
# writes (str as str, bytes as bin, every int in its smallest form, floats as float64, lists and tuples
# as arrays, in the map's own order; tests/test_client11_encode.py compares them), at 40 % of its
# cost for a request header (0.47 -> 0.18 us) and of a packed message's row list (3.9 -> 1.6 us for 32
# rows), and thread-safe (msgspec >= 0.16), so no per-thread Packer. Never used to read a peer's bytes.
# A value msgspec does not encode (msgpack's ExtType or Timestamp, which codec.pack does) raises TypeError
# there, and codec.pack packs it as before. A msgspec.Raw is written verbatim: the worker hands in parts
# of an answer it encoded once for several (worker/handoff.py), never a peer's bytes.
_ENCODE = msgspec.msgpack.Encoder().encode


def _encode(value: Any) -> bytes:
    try:
        return _ENCODE(value)
    except TypeError:
        return pack(value)  # raises its own TypeError for what neither packs


def _timing_entry(k: Any, v: Any) -> bool:
    return (type(k) is str and 0 < len(k) <= MAX_TIMING_KEY and type(v) in (int, float)
            and math.isfinite(v) and 0 <= v <= MAX_TIMING_MS)


def timing_ok(value: Any) -> bool:
    """Whether a reply's "timing" field may go to a client as it is: absent, or a map of at most
    MAX_TIMING short names to finite non-negative numbers."""
    if value is None:
        return True
    if type(value) is not dict or len(value) > MAX_TIMING:
        return False
    for k, v in value.items():  # a plain loop: this runs for every result the master forwards
        if not (type(k) is str and 0 < len(k) <= MAX_TIMING_KEY and (type(v) is float or type(v) is int)
                and 0 <= v <= MAX_TIMING_MS and v == v):  # v == v: not NaN; the bounds exclude inf
            return False
    return True


def clean_timing(value: Any) -> dict | None:
    """The entries of a peer's "timing" field that are well formed (None if none): a bad entry is
    dropped, never a reason to fail the reply it came with."""
    if type(value) is not dict:
        return None
    out = {k: v for k, v in itertools.islice(value.items(), MAX_TIMING) if _timing_entry(k, v)}
    return out or None


def is_model_name(name: str) -> bool:
    """Whether a master takes `name` as a model's service name: 1..MAX_NAME_LEN characters, not an
    RFC 8 "mmi." service. The master answers any other name with an error that carries no id (or as
    an MMI command), so the client refuses such a name at submit, where the caller sees why."""
    return 0 < len(name) <= MAX_NAME_LEN and not name.startswith("mmi.")


def check_id(value: Any, what: str = "id") -> str:
    """The one rule for an id on the wire (a client's request id, the master's dispatch key):
    a string of 1..MAX_ID_LEN characters. Every role checks ids with this function."""
    if type(value) is not str or not value or len(value) > MAX_ID_LEN:
        raise ProtocolError(f"field {what!r} must be a string of 1..{MAX_ID_LEN} characters, got {short_repr(value)}")
    return value


def request_frames(header: Any) -> int:
    """How many out-of-line tensor frames follow a client request header; -1 when the header
    cannot say (not a map, or a malformed tensor list). The master (checking a client's message)
    and the worker (splitting a REQUEST) both count with this one function."""
    return frame_count(header.get("inputs")) if type(header) is dict else -1


@dataclass(slots=True)  # one per request: quicker to build
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
    """Body frames of a client request: msgpack header (small tensors inline) then one raw frame
    per large tensor."""
    meta, frames = encode_tensors(inputs)
    return [pack(request_header(rid, meta, version, timeout_ms, ack, tags)), *frames]


def request_header(rid: str, meta: list, version: int | None = None, timeout_ms: float | None = None,
                   ack: bool = False, tags: Mapping[str, str] | None = None) -> dict:
    header = {"id": rid, "inputs": meta}
    if version is not None:
        header["version"] = version
    if timeout_ms is not None:
        header["timeout_ms"] = float(timeout_ms)
    if ack:
        header["ack"] = True
    if tags:
        header["tags"] = dict(tags)
    return header


def pack_header(header: dict) -> bytes:
    """A header our own code built (request_header's map) as msgpack: codec.pack's bytes, made cheaper."""
    return _encode(header)


def pack_rows(rows: list) -> bytes:
    """The first frame of a packed message (its row list: a client's [service, header] rows, a
    master's answer headers, a REQUEST's [fields..., header] rows) as msgpack: codec.pack's bytes."""
    return _encode(rows)


def client_frames(service: str | bytes, body: Sequence) -> list:
    """RFC 7 client framing around a body: [empty][MDPC01][service][body...]."""
    svc = service.encode() if isinstance(service, str) else service
    return [b"", MDP_CLIENT, svc, *body]


# ------------------------------------------------------- coalesced client traffic
# A ringserve client may put several requests in one message (service "mmi.batch"; an old master
# answers RFC 8's "501" and the client goes back to one message per request):
#     [empty][MDPC01]["mmi.batch"][msgpack [service 1, service 2, ...]][hdr 1][tensors 1...][hdr 2]...
# and a master answers a client that batches with every answer of one loop turn in one message:
#     [empty][MDPC01]["mmi.batch"][reply hdr 1][tensors 1...][reply hdr 2]...
# Requests are split with request_frames (the rule the worker uses too); answers with split_replies.
# Packed (issue 22; service "mmi.batch2", which a master that predates it answers RFC 8's "501", and
# the client falls back to "mmi.batch"): the headers ride in the first frame, as msgpack bin, and only
# out-of-line tensors have frames of their own, both ways:
#     [empty][MDPC01]["mmi.batch2"][msgpack [[service 1, hdr 1], [service 2, hdr 2], ...]][tensors 1...][tensors 2...]
#     [empty][MDPC01]["mmi.batch2"][msgpack [reply hdr 1, reply hdr 2, ...]][tensors 1...][tensors 2...]
# A master answers "mmi.batch2" only to a client that sent it (split_replies reads both answer forms).
MAX_CLIENT_BATCH = 1024  # requests in one coalesced client message


def batch_frames(requests: Sequence[tuple[bytes, Sequence]]) -> list:
    """[(service, body frames: header + tensors)] -> the frames after the "mmi.batch" service frame."""
    out = [pack([svc.decode() if isinstance(svc, bytes) else svc for svc, _ in requests])]
    for _, body in requests:
        out.extend(body)
    return out


def split_batch(frames: Sequence) -> tuple[list[tuple[str, Any, dict, list]], str | None]:
    """A coalesced client message -> ([(service, header frame, header map, tensor frames)], why the rest
    could not be split or None). Each request is cut where its header's tensor list says
    (request_frames); the entries before a break are kept, so one bad request never fails its
    neighbours. The header comes back unpacked (it had to be, to count its frames), so the master
    checks it without unpacking it again."""
    if not frames:
        return [], "a batch needs its list of services"
    services = unpack(frames[0])
    if not isinstance(services, list) or not 1 <= len(services) <= MAX_CLIENT_BATCH:
        return [], f"a batch's first frame must list 1..{MAX_CLIENT_BATCH} services"
    out, k = [], 1
    for svc in services:
        if k >= len(frames):
            return out, "the batch lists more requests than it carries"
        try:
            header = unpack(frames[k])
        except ProtocolError:
            header = None
        n = request_frames(header)  # -1 unless a map with a countable tensor list
        if n < 0 or k + 1 + n > len(frames) or type(svc) is not str:
            return out, "a request header's tensor list does not say how many frames follow"
        out.append((svc, frames[k], header, frames[k + 1:k + 1 + n] if n else []))
        k += 1 + n
    if k != len(frames):
        return out, f"the batch carries {len(frames) - k} frames no request accounts for"
    return out, None


def packed_frames(entries: Iterable[tuple[Any, Sequence]]) -> list:
    """[(row, its out-of-line frames)] -> [msgpack list of the rows][every entry's frames, in order]:
    the shape of every packed message (mmi.batch2 both ways, a framing-2 REQUEST and REPLY)."""
    rows, out = [], [b""]
    for row, frames in entries:
        rows.append(row)
        if frames:
            out.extend(frames)
    out[0] = pack_rows(rows)
    return out


def batch_frames_packed(requests: Sequence[tuple[bytes, Sequence]]) -> list:
    """[(service, body frames: header + tensors)] -> the frames after the "mmi.batch2" service frame."""
    return packed_frames(([svc.decode() if isinstance(svc, bytes) else svc, raw_bytes(body[0])], body[1:])
                         for svc, body in requests)


def answers_frames(bodies: Sequence[Sequence], packed: bool) -> list:
    """A master's answers to a batching client [(header frame, tensor frames...)] -> the frames after
    the service frame: "mmi.batch" (each header a frame) or "mmi.batch2" (the headers in one list)."""
    if packed:
        return packed_frames((raw_bytes(body[0]), body[1:]) for body in bodies)
    out: list = []
    for body in bodies:
        out.extend(body)
    return out


def split_batch_packed(frames: Sequence) -> tuple[list[tuple[str, bytes, dict, list]], str | None]:
    """split_batch for "mmi.batch2": the same entries, verdicts and rule (request_frames), the header
    taken from its [service, header] pair instead of a frame of its own. The Python path alone
    (split_batch_checked's, without the compiled step): what split_batch_checked is tested against."""
    out, why = _split_packed_batch(frames, compiled=False)
    return [entry[:4] for entry in out], why


def split_batch_checked(frames: Sequence) -> tuple[list[tuple[str, bytes, dict | None, list, ClientRequest | None]],
                                                    str | None]:
    """split_batch_packed ("mmi.batch2") with each request checked as it is split: the same entries,
    verdicts and order, each with one more item, `parse_request_header(header, tensors)` where the
    compiled path (protocol/fastcheck.py: the header's bytes decoded by msgspec into typed fields)
    accepted it, else None. Where it is given the header map is None (the caller needs neither: it
    unpacks the frame if it must); where it is None the map is given, unpacked as split_batch_packed
    does, and the caller checks it with parse_request_header, which words any refusal."""
    return _split_packed_batch(frames, compiled=True)


def _split_packed_batch(frames: Sequence, compiled: bool) -> tuple[list[tuple], str | None]:
    """The one splitter of "mmi.batch2" (split_batch_packed, split_batch_checked): each entry
    (service, header bytes, header map or None, tensor frames, ClientRequest or None). With
    `compiled`, a header the compiled path takes whole comes back checked and unpacked by nobody;
    every other one takes the Python step, which decides and words what is wrong."""
    if not frames:
        return [], "a batch needs its list of requests"
    try:
        rows = unpack(frames[0])
    except ProtocolError:
        rows = None
    if not isinstance(rows, list) or not 1 <= len(rows) <= MAX_CLIENT_BATCH:
        return [], f"a packed batch's first frame must list 1..{MAX_CLIENT_BATCH} [service, header] pairs"
    out, k, total = [], 1, len(frames)
    decode, fields, used = fastcheck.decode_request, fastcheck.request_fields, fastcheck.frames_used
    for row in rows:
        if not (type(row) is list and len(row) == 2 and type(row[0]) is str and type(row[1]) is bytes):
            return out, "each entry of a packed batch must be [service, header as bin]"
        svc, raw = row
        r = decode(raw) if compiled else None
        if r is not None:
            n = used(r)
            if k + n <= total:
                tensors = list(frames[k:k + n]) if n else []
                got = fields(r, tensors)
                if got is not None:
                    out.append((svc, raw, None, tensors, ClientRequest(*got)))
                    k += n
                    continue
        try:  # the Python step: it decides and words what the compiled path did not take
            header = unpack(raw)
        except ProtocolError:
            header = None
        n = request_frames(header)  # -1 unless a map with a countable tensor list
        if n < 0 or k + n > total:
            return out, "a request header's tensor list does not say how many frames follow"
        out.append((svc, raw, header, list(frames[k:k + n]) if n else [], None))
        k += n
    if k != total:
        return out, f"the batch carries {total - k} frames no request accounts for"
    return out, None


def parse_request_header(header: dict, frames: Sequence) -> ClientRequest:
    """Check every field of a client request; raise ProtocolError naming the bad one."""
    get = header.get
    rid = get("id")
    if type(rid) is not str or not 0 < len(rid) <= MAX_ID_LEN:
        check_id(rid)  # raises, with the one wording
    inputs = get("inputs")
    if inputs is None and "inputs" not in header:
        raise ProtocolError("missing field 'inputs'")
    check_tensors(inputs, frames)  # names, dtypes, shapes, byte counts
    version = get("version")
    if version is not None and (type(version) is not int and (not isinstance(version, int) or isinstance(version, bool))
                                or version < 0):
        raise ProtocolError("field 'version' must be a non-negative integer")
    timeout_ms = get("timeout_ms")
    if timeout_ms is not None and (type(timeout_ms) is not float and (not isinstance(timeout_ms, (int, float))
                                                                    or isinstance(timeout_ms, bool))
                                   or not timeout_ms > 0):
        raise ProtocolError("field 'timeout_ms' must be a positive number")
    tags = get("tags")
    if tags is not None and not (isinstance(tags, dict) and len(tags) <= MAX_TAGS and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_TAG_LEN and len(v) <= MAX_TAG_LEN
            for k, v in tags.items())):
        raise ProtocolError(f"field 'tags' must map at most {MAX_TAGS} strings to strings of <= {MAX_TAG_LEN} chars")
    ack = get("ack")
    return ClientRequest(rid, inputs, version, timeout_ms, bool(ack), tags)


def parse_reply(body: Sequence) -> tuple[dict, dict]:
    """A reply body (header + frames) -> (header, outputs as numpy arrays)."""
    if not body:
        raise ProtocolError("empty reply")
    header = unpack_map(body[0])
    outputs = decode_tensors(header.get("outputs", []), body[1:]) if header.get("ok") else {}
    return header, outputs


# ------------------------------------------------------------------ worker -> master
# The master trusts no peer: these turn a worker's msgpack map into clean typed values, or raise
# ProtocolError, before anything reaches the master's books.

@dataclass
class WorkerHello:
    """A validated READY."""

    name: str | None
    models: dict[str, dict]
    credit: int
    weight: float
    device: str
    pid: int | None
    framing: int = 1  # the worker-hop framing it reads (FRAMING)


@dataclass
class WorkerBeat:
    """A validated HEARTBEAT (models None when the worker did not say; credit None: unchanged)."""

    models: dict[str, dict] | None
    stats: dict | None
    draining: bool
    credit: int | None = None  # this master's share of the worker's credit now (several masters)


@dataclass
class WorkerReply:
    """A validated REPLY: `header` is rebuilt from checked fields only (the master sets the
    client's id, its epoch and the worker's name before it goes to the client)."""

    key: str  # the master's dispatch key the reply answers
    attempt: int
    ok: bool
    error_code: str | None
    header: dict


def _int(value: Any, what: str, lo: int, hi: int = MAX_INT) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(f"field {what!r} must be an integer in {lo}..{hi}, got {short_repr(value)}")
    return value


def _str(value: Any, what: str, max_len: int = MAX_NAME_LEN, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > max_len or (not value and not allow_empty):
        raise ProtocolError(f"field {what!r} must be a string of {0 if allow_empty else 1}..{max_len} "
                            f"characters, got {short_repr(value)}")
    return value


def _opt_str(value: Any, what: str) -> str | None:
    return None if value is None else _str(value, what, allow_empty=True)


def parse_models(models: Any) -> dict[str, dict]:
    """{model: {"version", "ready", "dtype", "quantize", "device", "versions"?, "refused"?}} -> a clean
    copy (str keys only); "versions" lists every version held side by side, "refused" the last
    version the worker could not load ({"version", "reason"})."""
    if not isinstance(models, dict) or not 1 <= len(models) <= MAX_MODELS:
        raise ProtocolError(f"field 'models' must be a map of 1..{MAX_MODELS} models")
    clean = {}
    for name, info in models.items():
        _str(name, "models key")  # bytes keys are refused here too
        if not isinstance(info, dict):
            raise ProtocolError(f"models[{name[:64]!r}] must be a map, got {short_repr(info)}")
        version = info.get("version")
        ready = info.get("ready", True)
        if not isinstance(ready, bool):
            raise ProtocolError(f"models[{name[:64]!r}].ready must be true or false")
        clean[name] = {"version": None if version is None else _int(version, "version", 0),
                       "ready": ready, "dtype": _opt_str(info.get("dtype"), "dtype"),
                       "quantize": _opt_str(info.get("quantize"), "quantize"),
                       "device": _opt_str(info.get("device"), "device")}
        on_demand = info.get("on_demand", False)
        if not isinstance(on_demand, bool):
            raise ProtocolError(f"models[{name[:64]!r}].on_demand must be true or false")
        if on_demand:
            clean[name]["on_demand"] = True
        inputs = info.get("inputs")
        if inputs is not None:
            clean[name]["inputs"] = _announced_inputs(inputs, name)
        cache = info.get("cache", False)
        if not isinstance(cache, bool):
            raise ProtocolError(f"models[{name[:64]!r}].cache must be true or false")
        if cache:
            clean[name]["cache"] = True
        held = info.get("versions")
        if held is not None:
            if not isinstance(held, list) or len(held) > MAX_HELD_VERSIONS:
                raise ProtocolError(f"models[{name[:64]!r}].versions must be a list of <= {MAX_HELD_VERSIONS}")
            clean[name]["versions"] = sorted({_int(v, "versions", 0) for v in held})
        ignored = info.get("ignored_keys")
        if ignored is not None:
            if not isinstance(ignored, list) or len(ignored) > MAX_HELD_VERSIONS * 4:
                raise ProtocolError(f"models[{name[:64]!r}].ignored_keys must be a short list")
            clean[name]["ignored_keys"] = [_str(k, "ignored_keys", MAX_TEXT) for k in ignored]
        refused = info.get("refused")
        if refused is not None:
            if not isinstance(refused, dict):
                raise ProtocolError(f"models[{name[:64]!r}].refused must be a map")
            clean[name]["refused"] = {"version": _int(refused.get("version"), "refused.version", 0),
                                      "reason": _str(refused.get("reason", ""), "refused.reason", MAX_TEXT,
                                                     allow_empty=True)}
    return clean


def _announced_inputs(inputs: Any, model: str) -> list:
    """A model's declared inputs as a worker announces them: [[name, dtype, dims or nil]], bounded."""
    if not isinstance(inputs, list) or len(inputs) > 64:
        raise ProtocolError(f"models[{model[:64]!r}].inputs must be a list of at most 64 inputs")
    clean = []
    for entry in inputs:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise ProtocolError(f"models[{model[:64]!r}].inputs entries must be [name, dtype, dims]")
        name, dtype, dims = entry
        _str(name, "inputs name")
        _str(dtype, "inputs dtype", 32)
        if dims is not None and not (isinstance(dims, list) and len(dims) <= 8 and all(
                type(d) is int and -1 <= d <= 2**31 - 1 for d in dims)):
            raise ProtocolError(f"models[{model[:64]!r}].inputs dims must be at most 8 ints (-1: any)")
        clean.append([name, dtype, dims])
    return clean


def parse_ready(info: Any) -> WorkerHello:
    """Check a READY header: models map of maps, credit an int in range, weight finite and > 0."""
    if not isinstance(info, dict):
        raise ProtocolError("READY header must be a map")
    if "models" not in info:
        raise ProtocolError("READY needs a 'models' map")
    weight = info.get("weight", 1.0)
    if (not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight)
            or not 0 < weight <= MAX_WEIGHT):
        raise ProtocolError(f"field 'weight' must be a finite number in (0, {MAX_WEIGHT:g}], got {short_repr(weight)}")
    pid = info.get("pid")
    return WorkerHello(name=_opt_str(info.get("name"), "name") or None,
                       models=parse_models(info["models"]),
                       credit=_int(info.get("credit", 1), "credit", 1, MAX_CREDIT),
                       weight=float(weight),
                       device=_str(info.get("device", "?"), "device", allow_empty=True),
                       pid=None if pid is None else _int(pid, "pid", 0),
                       framing=peer_framing(info))


def peer_framing(info: Mapping) -> int:
    """The worker-hop framing a peer says it reads (its READY, or a master's HEARTBEAT): 1 when it
    does not say (it predates FRAMING), at most our own; a value that is not a positive int is 1."""
    value = info.get("framing")
    if type(value) is not int or value < 1:
        return 1
    return min(value, FRAMING)


def parse_heartbeat(info: Any) -> WorkerBeat:
    """Check a worker's HEARTBEAT; stats keep only short scalar entries (they are shown, not used)."""
    if not isinstance(info, dict):
        raise ProtocolError("HEARTBEAT header must be a map")
    models = parse_models(info["models"]) if info.get("models") is not None else None
    stats = info.get("stats")
    if stats is not None:
        if not isinstance(stats, dict):
            raise ProtocolError("field 'stats' must be a map")
        stats = {k: v for k, v in list(stats.items())[:MAX_STATS]
                 if isinstance(k, str) and len(k) <= 64
                 and (v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= 128))}
    draining = info.get("draining", False)
    if not isinstance(draining, bool):
        raise ProtocolError("field 'draining' must be true or false")
    credit = info.get("credit")
    return WorkerBeat(models, stats, draining, None if credit is None else _int(credit, "credit", 1, MAX_CREDIT))


def reply_key(header: dict) -> Any:
    """The dispatch key a worker's reply answers ("key"; a worker that wrote none answers by "id")."""
    key = header.get("key")
    return header.get("id") if key is None else key


def parse_worker_reply(header: Any, frames: Sequence) -> WorkerReply:
    """Check a REPLY: key, attempt, and either outputs that match the frames or a typed error.

    An error's frames (there should be none) are not passed on; an unknown code becomes INTERNAL.
    """
    if not isinstance(header, dict):
        raise ProtocolError("REPLY header must be a map")
    key = check_id(reply_key(header), "key")
    attempt = _int(header.get("attempt"), "attempt", 1)
    ok = header.get("ok")
    if not isinstance(ok, bool):
        raise ProtocolError("field 'ok' must be true or false")
    clean: dict[str, Any] = {"ok": ok, "attempt": attempt}
    for field in ("version", "batch_rows"):
        if isinstance(header.get(field), int) and not isinstance(header.get(field), bool):
            clean[field] = header[field]
    if isinstance(header.get("model"), str) and len(header["model"]) <= MAX_NAME_LEN:
        clean["model"] = header["model"]
    timing = clean_timing(header.get("timing"))
    if timing is not None:
        clean["timing"] = timing
    if ok:
        check_tensors(header.get("outputs"), frames)
        clean["outputs"] = header["outputs"]
        return WorkerReply(key, attempt, True, None, clean)
    error = header.get("error")
    if not isinstance(error, dict):
        raise ProtocolError("an error REPLY needs an 'error' map")
    code = error.get("code") if error.get("code") in ErrorCode.ALL else ErrorCode.INTERNAL
    message = error.get("message")
    message = message[:MAX_TEXT] if isinstance(message, str) else "no message"
    clean["error"] = {"code": code, "message": message}
    return WorkerReply(key, attempt, False, code, clean)


# ------------------------------------------------------- several per message
# A master -> worker REQUEST carries one dispatch list and, per request, the client's own header
# (forwarded as received, never re-packed) and its out-of-line tensor frames. Framing 1:
#     [REQUEST][msgpack [[key, attempt, model, version, timeout_ms], ...]][hdr 1][frames 1...][hdr 2]...
# framing 2 (a worker that said so in READY): each client header rides in its dispatch entry, as
# msgpack bin, so a REQUEST of requests whose tensors are all inline is one frame:
#     [REQUEST][msgpack [[key, attempt, model, version, timeout_ms, hdr 1], ...]][frames 1...][frames 2...]...
# `key` is the master's own name for the request (unique per master process; never the
# client's id, which two tenants may share). The worker answers by key and writes the client's
# id beside it, so a result header can go on to the client as it is.
# A worker -> master REPLY carries one or more replies, each a header and its out-of-line frames.
# Framing 1:
#     [REPLY][hdr 1][frames 1...][hdr 2][frames 2...]...
# framing 2 (a master that said so in its HEARTBEAT): the headers, each packed as msgpack bin, in one
# list first, then every reply's out-of-line frames in order:
#     [REPLY][msgpack [hdr 1, hdr 2, ...]][frames 1...][frames 2...]...
# split_replies reads both (a header is a map, the packed list a list), so does parse_dispatch.

class Dispatch:
    """One request as a worker gets it: the master's routing fields and the client's header.
    `error` says what is wrong with this one request (it is answered BAD_REQUEST by its key).
    Where the compiled path (fastcheck) took the REQUEST, `arrays` holds the inputs already decoded
    (decode_tensors of the header's tensor list) and `header` is unpacked from `raw` only when read:
    the worker needs no other field of it."""

    __slots__ = ("key", "attempt", "model", "version", "timeout_ms", "_header", "frames", "error", "cid", "raw",
                 "arrays")

    def __init__(self, key: str, attempt: int, model: str, version: int | None, timeout_ms: float,
                 header: dict | None, frames: list, error: str | None = None, cid: str | None = None,
                 raw: bytes | None = None, arrays: dict | None = None) -> None:
        self.key, self.attempt, self.model, self.version, self.timeout_ms = key, attempt, model, version, timeout_ms
        self._header, self.frames, self.error, self.cid, self.raw, self.arrays = header, frames, error, cid, raw, arrays

    @property
    def header(self) -> dict:
        if self._header is None:
            self._header = unpack(self.raw) if self.raw is not None else {}
        return self._header

    def _fields(self) -> tuple:
        return (self.key, self.attempt, self.model, self.version, self.timeout_ms, self.header, self.frames,
                self.error, self.cid)

    def __eq__(self, other: object) -> bool:  # as the dataclass it was: the routing fields, header and frames
        return type(other) is Dispatch and self._fields() == other._fields()

    def __repr__(self) -> str:
        return (f"Dispatch(key={self.key!r}, attempt={self.attempt!r}, model={self.model!r}, version={self.version!r}, "
                f"timeout_ms={self.timeout_ms!r}, header={self.header!r}, frames={self.frames!r}, "
                f"error={self.error!r}, cid={self.cid!r})")


def raw_bytes(frame: Any) -> bytes:
    """A frame's bytes (a zmq.Frame's are cached by pyzmq, so asking twice copies once)."""
    if type(frame) is bytes:
        return frame
    data = getattr(frame, "bytes", None)
    return data if type(data) is bytes else bytes(frame)


def dispatch_frames(entries: Sequence[tuple[list, Any, Sequence]]) -> list:
    """[(routing fields, client header frame, tensor frames)] -> the frames after [REQUEST] (framing 1)."""
    out = [pack([e[0] for e in entries])]
    for _, header_frame, frames in entries:
        out.append(header_frame)
        out.extend(frames)
    return out


def dispatch_frames_packed(entries: Sequence[tuple[list, Any, Sequence]]) -> list:
    """The same REQUEST in framing 2: each client header (its bytes as received) appended to its
    routing fields, only out-of-line tensor frames after the list."""
    return packed_frames(([*fields, raw_bytes(header_frame)], frames) for fields, header_frame, frames in entries)


def dispatch_one_packed(rows: list[list]) -> list | None:
    """A framing-2 REQUEST of requests that carry no out-of-line frames, from its entries already in
    their packed form (`[key, attempt, model, version, timeout_ms, header bytes]`): its one frame, the
    same as dispatch_frames_packed's; None when the entries do not fit one REQUEST (dispatch_chunks
    would cut them), so the caller takes the general path."""
    if len(rows) > MAX_PER_MESSAGE:
        return None
    total = 0
    for row in rows:
        total += len(row[5])
    if total > MAX_PACKED_BYTES and len(rows) > 1:
        return None
    return [pack(rows)]


def bounded_chunks(items: Iterable, max_count: int, max_bytes: int, size: Callable[[Any], int],
                   count: Callable[[Any], int] | None = None) -> list[list]:
    """`items` cut, in order, into chunks of at most `max_count` (each item counting `count(item)`,
    1 by default) and at most `max_bytes` (`size(item)`), except that a chunk's first item always
    goes: the one rule for every message several items share (REQUEST, REPLY, a client's answers)."""
    chunks: list[list] = []
    chunk: list = []
    n = total = 0
    for item in items:
        k, b = (1 if count is None else count(item)), size(item)
        if chunk and (n + k > max_count or total + b > max_bytes):
            chunks.append(chunk)
            chunk, n, total = [], 0, 0
        chunk.append(item)
        n += k
        total += b
    if chunk:
        chunks.append(chunk)
    return chunks


def dispatch_chunks(entries: Sequence[tuple[list, Any, Sequence]], max_count: int = MAX_PER_MESSAGE,
                    max_bytes: int = MAX_PACKED_BYTES) -> list[list]:
    """Entries cut into REQUESTs a worker accepts: at most max_count each (MAX_PER_MESSAGE is what
    parse_dispatch takes) and, past the first entry, at most max_bytes of client headers."""
    return bounded_chunks(entries, max_count, max_bytes, lambda e: len(e[1]))


def parse_dispatch(frames: Sequence) -> list[Dispatch]:
    """A worker reads a REQUEST (either framing; an entry of six items carries its client header,
    one of five has it in the next frame): every routing field and client header checked with the
    same functions the master used (`request_frames`, `parse_request_header`), frames counted.
    A framing-2 REQUEST the compiled checks take whole (`_fast_dispatch`, protocol/fastcheck.py)
    comes back from them, the same values, with each request's inputs already decoded (`arrays`).

    Raises ProtocolError only when the dispatch list itself is unreadable (there is no key to
    answer). Otherwise every entry with a usable key comes back, those that cannot be used with
    `error` set (answered BAD_REQUEST): a bad field or header fails its own entry; a header
    whose frames cannot be counted, or frames that do not add up, fail that entry and every
    later one (their frames can no longer be told apart), never the entries before it."""
    fast = _fast_dispatch(frames) if frames else None  # an empty REQUEST: the Python path says what is wrong
    return fast if fast is not None else _python_dispatch(frames)


def _python_dispatch(frames: Sequence) -> list[Dispatch]:
    """parse_dispatch's own checks, in Python: the one authority on every refusal and its wording."""
    if not frames:
        raise ProtocolError("REQUEST needs a dispatch list")
    routing = unpack(frames[0])
    if not isinstance(routing, list) or not 1 <= len(routing) <= MAX_PER_MESSAGE:
        raise ProtocolError(f"REQUEST dispatch must be a list of 1..{MAX_PER_MESSAGE} entries")
    spans: list[tuple[Any, Any, list, str | None]] = []  # (entry, header, data, why it cannot be split)
    k, broken, total = 1, None, len(frames)
    for entry in routing:
        header, data = None, []
        if broken is None:
            inline = type(entry) is list and len(entry) == 6
            if not inline and k >= total:
                broken = "the REQUEST lists more requests than it carries"
            else:
                raw = entry[5] if inline else frames[k]
                if not inline:
                    k += 1
                try:
                    header = unpack(raw) if not inline or type(raw) is bytes else None
                except ProtocolError:
                    header = None
                n = request_frames(header)
                if n < 0 or k + n > total:
                    broken = "the request header's tensor list does not say how many frames follow"
                else:
                    data = list(frames[k:k + n]) if n else []
                k += max(n, 0)
        spans.append((entry, header, data, broken))
    if broken is None and k != total:
        broken = f"the REQUEST carries {total - k} frames no request accounts for"
        spans = [(e, h, d, broken) for e, h, d, _ in spans]
    out = []
    for entry, header, data, why in spans:
        try:
            if why is not None:
                raise ProtocolError(f"could not split the REQUEST: {why}")
            out.append(_dispatch_entry(entry, header, data))
        except ProtocolError as exc:
            key = entry[0] if isinstance(entry, list) and entry else None
            if type(key) is str and 0 < len(key) <= MAX_ID_LEN:
                attempt = entry[1] if len(entry) > 1 and type(entry[1]) is int and entry[1] >= 1 else 1
                cid = header.get("id") if type(header) is dict and type(header.get("id")) is str else None
                out.append(Dispatch(key, attempt, "", None, 0.0, {}, [], error=str(exc), cid=cid))
    return out


def _fast_dispatch(frames: Sequence) -> list[Dispatch] | None:
    """parse_dispatch's answer for a framing-2 REQUEST the compiled checks (protocol/fastcheck.py)
    take whole: every routing entry and client header accepted, the frames adding up; each Dispatch
    with its inputs decoded (`arrays`) and its header left packed (`raw`). None for anything else,
    a single entry it does not take included: the Python path then decides the whole REQUEST, and
    words every refusal, so this path never changes a verdict."""
    rows = fast_requests(frames)
    if rows is None:
        return None
    return [Dispatch(key, attempt, model, version, timeout_ms, None, data, cid=cid, raw=raw, arrays=arrays)
            for key, attempt, model, version, timeout_ms, cid, data, arrays, raw in rows]


def fast_requests(frames: Sequence) -> list[tuple] | None:
    """The compiled path of parse_dispatch (`_fast_dispatch`, whose checks these are) as plain rows,
    for a worker that builds its own object per request and needs no Dispatch in between:
    ``(key, attempt, model, version, timeout_ms, client id, tensor frames, inputs decoded, client
    header packed)`` per request, in order; None wherever `_fast_dispatch` is None (the caller then
    asks parse_dispatch, whose Python path decides and words every refusal)."""
    if not frames:
        return None
    routes = fastcheck.decode_routes(frames[0])
    if routes is None:
        return None
    decode, used, arrays_of = fastcheck.decode_request, fastcheck.frames_used, fastcheck.request_arrays
    isfinite = math.isfinite
    out, k, total = [], 1, len(frames)
    append = out.append
    for rt in routes:
        raw = rt.header
        r = decode(raw)
        if r is None:
            return None
        n = used(r)
        if n:
            if k + n > total:
                return None
            data = list(frames[k:k + n])
            k += n
        else:
            data = []
        arrays = arrays_of(r, data)
        timeout_ms = rt.timeout_ms
        if arrays is None or not isfinite(timeout_ms):
            return None
        append((rt.key, rt.attempt, rt.model, rt.version, float(timeout_ms), r.id, data, arrays, raw))
    return out if k == total else None


def _dispatch_entry(entry: Any, header: Any, data: list) -> Dispatch:
    if not (isinstance(entry, list) and len(entry) in (5, 6)):
        raise ProtocolError("each dispatch entry must be [key, attempt, model, version, timeout_ms]")
    key, attempt, model, version, timeout_ms = entry[:5]
    key = check_id(key, "key")
    attempt = _int(attempt, "attempt", 1)
    model = _str(model, "model")
    version = None if version is None else _int(version, "version", 0)
    if (not isinstance(timeout_ms, (int, float)) or isinstance(timeout_ms, bool)
            or not math.isfinite(timeout_ms)):
        raise ProtocolError("field 'timeout_ms' must be a finite number")
    if not isinstance(header, dict):
        raise ProtocolError("the request header must be a msgpack map")
    parsed = parse_request_header(header, data)  # the master's own check, so both give one verdict
    return Dispatch(key, attempt, model, version, float(timeout_ms), header, data, cid=parsed.rid)


def reply_frames(replies: Sequence[tuple[dict, Sequence]]) -> list:
    """[(reply header, out-of-line frames)] -> the frames after [REPLY] (framing 1)."""
    out: list = []
    for header, frames in replies:
        out.append(pack(header))
        out.extend(frames)
    return out


def packed_reply_frames(headers: Sequence[bytes], frames: Sequence) -> list:
    """Framing 2: every reply's packed header in one list, then all their out-of-line frames in order."""
    return [pack(list(headers)), *frames]


def reply_parts(frames: Sequence, count: int) -> tuple[list[bytes], list]:
    """Framing-1 reply frames known to hold `count` replies (as the worker's compute thread hands
    them over) -> (each reply's header bytes, the out-of-line frames in order), for
    packed_reply_frames. When there are as many frames as replies every frame is a header (each
    reply has one), so nothing is unpacked; otherwise the headers are found as split_replies does."""
    if count == len(frames):
        return [raw_bytes(f) for f in frames], []
    headers: list[bytes] = []
    data: list = []
    for raw, _, tensors in split_replies(frames):
        headers.append(raw_bytes(raw))
        data.extend(tensors)
    return headers, data


def _reply_frame_count(header: dict) -> int:
    # a result's outputs say how many frames follow; anything else (an error, an ACK, a ping's
    # answer) has none
    n = frame_count(header["outputs"]) if header.get("ok") is True and "outputs" in header else 0
    if n < 0:
        raise ProtocolError("field 'outputs' must be a list of tensors")
    return n


def split_replies(frames: Sequence) -> list[tuple[Any, dict, list]]:
    """A REPLY (the master reading a worker), or a master's coalesced answers (a client reading
    "mmi.batch"), in either framing: [(header frame or bytes, header map, its frames)] per reply.

    Only the frame counts are read here (from the outputs lists); parse_worker_reply checks the rest."""
    if not frames:
        raise ProtocolError("REPLY needs a header")
    first = unpack(frames[0])
    if type(first) is list:
        return _split_packed(first, frames)
    if type(first) is not dict:
        raise ProtocolError("body must be a msgpack map")
    out, k, header = [], 0, first
    while True:
        n = _reply_frame_count(header)
        if k + 1 + n > len(frames):
            raise ProtocolError("a reply lists more tensors out of line than the message carries")
        out.append((frames[k], header, list(frames[k + 1:k + 1 + n])))
        k += 1 + n
        if k >= len(frames):
            return out
        if len(out) >= MAX_PER_MESSAGE:
            raise ProtocolError(f"more than {MAX_PER_MESSAGE} replies in one message")
        header = unpack_map(frames[k])


def _split_packed(headers: list, frames: Sequence) -> list[tuple[Any, dict, list]]:
    if not 1 <= len(headers) <= MAX_PER_MESSAGE:
        raise ProtocolError(f"a packed reply list must hold 1..{MAX_PER_MESSAGE} headers")
    out, k, total = [], 1, len(frames)
    for raw in headers:
        if type(raw) is not bytes:
            raise ProtocolError("a packed reply list must hold msgpack maps packed as bin")
        header = unpack_map(raw)
        n = _reply_frame_count(header)
        if k + n > total:
            raise ProtocolError("a reply lists more tensors out of line than the message carries")
        out.append((raw, header, list(frames[k:k + n]) if n else []))
        k += n
    if k != total:
        raise ProtocolError(f"the message carries {total - k} frames no reply accounts for")
    return out


def split_results(frames: Sequence, epoch: str, worker: str) -> list[tuple[Any, dict | None, list, tuple | None]]:
    """split_replies(frames) for the master's on_replies, each reply with what it would check of it:
    [(header frame or bytes, header map or None, its frames, checked or None)]. `checked` is
    (key, attempt, version, passes, the header's "id") where the compiled path (protocol/fastcheck.py)
    took the header: a result (ok true, only REPLY_FIELDS, an int version) for which the first four
    are checked_result(header, frames, epoch, worker)'s answer; its map is then None (unpack_map of
    the header frame gives it to a caller that needs it). A message the compiled path does not take
    whole (framing 1, any header it does not accept) comes back as split_replies splits it, each
    `checked` None, so its errors, their wording and their order stay split_replies'."""
    headers = fastcheck.decode_packed(frames[0]) if frames else None
    if headers is not None:
        out, k, total, fast = [], 1, len(frames), fastcheck.fast_result
        for raw in headers:
            got = fast(raw, frames, k, total, epoch, worker)
            if got is None:
                break
            n, checked = got
            out.append((raw, None, list(frames[k:k + n]) if n else [], checked))
            k += n
        else:
            if k == total:
                return out
    return [(h, m, d, None) for h, m, d in split_replies(frames)]


def forwardable_result(header: dict, frames: Sequence) -> str:
    """The key of a result header that `forwardable` accepted, after the checks parse_worker_reply
    makes of a result (key, attempt, outputs against frames); raises ProtocolError like it."""
    key = check_id(reply_key(header), "key")
    _int(header.get("attempt"), "attempt", 1)
    check_tensors(header.get("outputs"), frames)
    return key


def checked_result(header: dict, frames: Sequence, epoch: str, worker: str) -> tuple[str, int, int, bool]:
    """A result header whose fields are all REPLY_FIELDS and whose version is an int, checked once
    for the master's forwarding: (key, attempt, version, whether it may go to the client byte for
    byte if its "id" is the request's). The checks are forwardable_result's (raising ProtocolError
    like it) and then forwardable's without the id, in one pass over the header."""
    get = header.get
    key = get("key")
    if key is None:
        key = get("id")  # reply_key
    if type(key) is not str or not 0 < len(key) <= MAX_ID_LEN:
        check_id(key, "key")  # raises
    attempt = get("attempt")
    if type(attempt) is not int or not 1 <= attempt <= MAX_INT:
        _int(attempt, "attempt", 1)  # raises unless an int subclass in range
    check_tensors(get("outputs"), frames)
    rows, model = get("batch_rows"), get("model")
    passes = (get("epoch") == epoch and get("worker") == worker and (rows is None or type(rows) is int)
              and (model is None or (type(model) is str and len(model) <= MAX_NAME_LEN))
              and timing_ok(get("timing")))
    return key, attempt, header["version"], passes


def forwardable(header: dict, epoch: str, worker: str, rid: str) -> bool:
    """Whether a result header can go to the client byte for byte: only known fields, well-typed
    optional ones, the client's own id `rid`, the master's own epoch and the worker's registered
    name (else the master re-packs it from the fields parse_worker_reply keeps)."""
    if not (header.get("id") == rid and header.get("epoch") == epoch and header.get("worker") == worker
            and header.keys() <= REPLY_FIELDS):
        return False
    version, rows, model = header.get("version"), header.get("batch_rows"), header.get("model")
    return ((version is None or type(version) is int) and (rows is None or type(rows) is int)
            and (model is None or (type(model) is str and len(model) <= MAX_NAME_LEN))
            and timing_ok(header.get("timing")))
