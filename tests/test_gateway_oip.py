"""gateway/oip.py's reused response headers: a header taken from the cache is byte for byte the one
that would be built, and anything that changes it (shape, dtype, version, an id, JSON outputs)
is not served from a header built for something else."""
from __future__ import annotations

import numpy as np
import orjson
import pytest

from ringserve.gateway import oip
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
