"""gateway/oip.py's reused response headers: a header taken from the cache is byte for byte the one
that would be built, and anything that changes it (shape, dtype, version, an id, JSON outputs)
is not served from a header built for something else."""
from __future__ import annotations

import numpy as np
import orjson
import pytest

from ringserve.gateway import oip
from ringserve.gateway.errors import HttpError
from ringserve.gateway.oip import InferCall, build_response

pytestmark = pytest.mark.timeout(30)


def fresh(model, version, call, outputs):
    oip._heads.clear()
    return build_response(model, version, call, outputs)


@pytest.mark.parametrize("rows,dtype,version,rid,binary", [
    (1, np.float32, 1, None, True), (4, np.float32, 1, None, True), (1, np.float64, 1, None, True),
    (1, np.float32, 2, None, True), (1, np.float32, 1, "req-7", True), (1, np.float32, 1, None, False)])
def test_a_reused_header_is_the_one_that_would_be_built(rows, dtype, version, rid, binary):
    oip._heads.clear()
    warm = InferCall({}, binary_output=True)
    build_response("mlp", 1, warm, {"logits": np.zeros((1, 10), np.float32)})  # caches the 1x10 fp32 v1 header
    call = InferCall({}, request_id=rid, binary_output=binary)
    outputs = {"logits": np.arange(rows * 10, dtype=dtype).reshape(rows, 10)}
    got = build_response("mlp", version, call, outputs)
    want = fresh("mlp", version, call, outputs)
    assert got[0] == want[0] and got[2] == want[2]
    assert [bytes(b) for b in got[1]] == [bytes(b) for b in want[1]]
    head = orjson.loads(got[0])
    assert head["outputs"][0]["shape"] == [rows, 10] and head["model_version"] == str(version)
    if binary:
        assert bytes(got[1][0]) == outputs["logits"].tobytes()


def test_ids_and_json_outputs_are_not_cached_and_the_cache_is_bounded():
    oip._heads.clear()
    build_response("mlp", 1, InferCall({}, request_id="a", binary_output=True), {"y": np.zeros(3, np.int64)})
    build_response("mlp", 1, InferCall({}), {"y": np.zeros(3, np.int64)})
    assert not oip._heads
    for k in range(oip.HEAD_CACHE + 5):
        build_response(f"m{k}", 1, InferCall({}, binary_output=True), {"y": np.zeros(3, np.int64)})
    assert 0 < len(oip._heads) <= oip.HEAD_CACHE


def binary_body(inputs: list[tuple[str, str, list, bytes]]) -> tuple[memoryview, int]:
    head = orjson.dumps({"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                                    for n, d, s, b in inputs]})
    return memoryview(head + b"".join(b for *_, b in inputs)), len(head)


@pytest.mark.parametrize("cached", [False, True])
def test_binary_inputs_are_views_of_the_body_with_every_check_kept(cached):
    """A binary input of the right size is viewed in place (np.ndarray on the body at its offset):
    the values, dtype, shape and read-only flag are those numpy.frombuffer gave, the second
    input starts where the first ends, empty tensors work, and BOOL values, a wrong size and a
    short body are still refused, from a cached plan as from a new one."""
    oip._plans.clear()
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([[1, -2, 3]], dtype=np.int64)
    for _ in range(2 if cached else 1):
        body, hlen = binary_body([("a", "FP32", [3, 4], a.tobytes()), ("b", "INT64", [1, 3], b.tobytes()),
                                  ("e", "FP16", [0, 5], b""), ("t", "BOOL", [2], b"\x01\x00")])
        call = oip.parse_infer(body, hlen)
    assert (len(oip._plans) == 1) and call.plan is oip._plans[bytes(body[:hlen])]
    assert call.plan.rows == 3
    got = call.inputs
    assert np.array_equal(got["a"], a) and got["a"].dtype == np.float32 and got["a"].shape == (3, 4)
    assert np.array_equal(got["b"], b) and got["e"].shape == (0, 5) and got["t"].tolist() == [True, False]
    assert not got["a"].flags.writeable and np.shares_memory(got["a"], np.frombuffer(body, np.uint8))
    for inputs, text in [([("t", "BOOL", [2], b"\x01\x07")], "BOOL bytes must be 0 or 1"),
                         ([("a", "FP32", [3, 4], a.tobytes()[:-4])], "needs 48 bytes")]:
        for _ in range(2):  # a new plan, then the cached one
            body, hlen = binary_body(inputs)
            with pytest.raises(HttpError, match=text):
                oip.parse_infer(body, hlen)
    body, hlen = binary_body([("a", "FP32", [3, 4], a.tobytes())])
    with pytest.raises(HttpError, match="runs past the end of the body"):
        oip.parse_infer(body[:-1], hlen)


def test_small_outputs_are_copied_large_ones_viewed_and_both_are_the_array_bytes():
    oip._heads.clear()
    small = np.arange(10, dtype=np.float32).reshape(1, 10)
    large = np.arange(oip.COPY_BELOW, dtype=np.float32).reshape(4, -1)
    for _ in range(2):  # built, then from the cached header
        _, raw, _ = build_response("mlp", 1, InferCall({}, binary_output=True), {"s": small, "l": large})
        assert isinstance(raw[0], bytes) and isinstance(raw[1], memoryview)
        assert bytes(raw[0]) == small.tobytes() and bytes(raw[1]) == large.tobytes()
    col = np.asfortranarray(np.arange(2 * oip.COPY_BELOW, dtype=np.float32).reshape(2, -1))  # not C-ordered
    _, raw, _ = build_response("mlp", 1, InferCall({}, binary_output=True), {"c": col})
    assert bytes(raw[0]) == np.ascontiguousarray(col).tobytes()


def _wire(outputs: dict[str, np.ndarray], frame_names: set[str]) -> tuple[list, list]:
    """The checked tensor list as the client hands it over (client Reply.raw): small tensors inline,
    the others as frames."""
    from ringserve.protocol.codec import check_tensors
    meta, frames = [], []
    for name, arr in outputs.items():
        if name in frame_names:
            meta.append([name, str(arr.dtype), list(arr.shape)])
            frames.append(memoryview(arr.tobytes()))
        else:
            meta.append([name, str(arr.dtype), list(arr.shape), arr.tobytes()])
    check_tensors(meta, frames)
    return meta, frames


@pytest.mark.parametrize("asked", [None, [("b", None), ("a", True)], [("a", None)]])
def test_an_answer_written_from_the_raw_buffers_is_the_response_build_response_gives(asked):
    """raw_response serves a form only after build_response built (and reused) its header, and then
    gives the same header and the same bytes, in the order the outputs were asked, from the inline
    bytes and the frames as they arrived."""
    oip._heads.clear()
    oip._raw_heads.clear()
    rng = np.random.default_rng(3)
    outputs = {"a": rng.standard_normal((2, 3)).astype(np.float32), "b": np.arange(5000, dtype=np.int64)}
    meta, frames = _wire(outputs, {"b"})
    call = InferCall({}, outputs=asked, binary_output=True)
    assert oip.raw_response("mlp", 1, call, meta, frames) is None  # nothing built for this form yet
    oip.remember_raw("mlp", 1, call, meta, outputs, b"{}")  # not the header build_response keeps: ignored
    assert not oip._raw_heads
    head, raw, hlen = build_response("mlp", 1, call, outputs)
    oip.remember_raw("mlp", 1, call, meta, outputs, head)
    got = oip.raw_response("mlp", 1, call, meta, frames)
    assert got is not None
    assert got[0] == head and got[2] == str(hlen).encode()
    assert [bytes(b) for b in got[1]] == [head, *[bytes(b) for b in raw]]
    names = [n for n, _ in asked] if asked else list(outputs)
    assert [bytes(b) for b in got[1][1:]] == [outputs[n].tobytes() for n in names]


def test_raw_answers_of_another_form_are_not_served_from_a_remembered_header():
    oip._heads.clear()
    oip._raw_heads.clear()
    call = InferCall({}, binary_output=True)
    outputs = {"logits": np.zeros((1, 10), np.float32)}
    meta, frames = _wire(outputs, set())
    for _ in range(2):
        head, _, _ = build_response("mlp", 1, call, outputs)
        oip.remember_raw("mlp", 1, call, meta, outputs, head)
    assert oip.raw_response("mlp", 1, call, meta, frames) is not None
    other_shape, _ = _wire({"logits": np.zeros((2, 10), np.float32)}, set())
    other_dtype, _ = _wire({"logits": np.zeros((1, 10), np.float64)}, set())
    other_name, _ = _wire({"y": np.zeros((1, 10), np.float32)}, set())
    as_frame, fr = _wire(outputs, {"logits"})
    assert oip.raw_response("mlp", 1, call, other_shape, frames) is None
    assert oip.raw_response("mlp", 1, call, other_dtype, frames) is None
    assert oip.raw_response("mlp", 1, call, other_name, frames) is None
    assert oip.raw_response("mlp", 1, call, as_frame, fr) is None
    assert oip.raw_response("mlp", 2, call, meta, frames) is None
    assert oip.raw_response("other", 1, call, meta, frames) is None
    assert oip.raw_response("mlp", 1, InferCall({}, request_id="r1", binary_output=True), meta, frames) is None
    assert oip.raw_response("mlp", 1, InferCall({}), meta, frames) is None  # JSON outputs
    assert oip.raw_response("mlp", 1, InferCall({}, outputs=[("logits", False)], binary_output=True),
                            meta, frames) is None
    for k in range(oip.HEAD_CACHE + 5):
        m = f"m{k}"
        for _ in range(2):
            head, _, _ = build_response(m, 1, call, outputs)
            oip.remember_raw(m, 1, call, meta, outputs, head)
    assert 0 < len(oip._raw_heads) <= oip.HEAD_CACHE


def test_strings_are_never_answered_from_raw_buffers():
    oip._heads.clear()
    oip._raw_heads.clear()
    from ringserve.protocol.codec import encode_tensors
    arr = np.array([b"ab", b"c"], dtype=object)
    meta, frames = encode_tensors({"s": arr})
    call = InferCall({}, binary_output=True)
    for _ in range(2):
        head, _, _ = build_response("mlp", 1, call, {"s": arr})
        oip.remember_raw("mlp", 1, call, meta, {"s": arr}, head)
    assert not oip._raw_heads and oip.raw_response("mlp", 1, call, meta, frames) is None
