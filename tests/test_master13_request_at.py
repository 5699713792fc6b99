"""Issue 22, eleventh round: fastcheck.request_at (the mmi.batch2 splitter's one call per request)
gives what decode_request, frames_used and request_fields gave in its place, for the same bytes and
frames, at any offset into a message's frames and with frames short, exact or to spare; and the
master's REQUEST and answer lists, now packed with pack_rows, are codec.pack's bytes."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringserve.protocol import fastcheck
from ringserve.protocol.codec import pack
from ringserve.protocol.envelope import dispatch_one_packed, pack_rows
from tests.test_proto8_fastcheck import request

pytestmark = pytest.mark.timeout(120)


def three_calls(raw, frames, k, end):
    """What _split_packed_batch did before request_at: decode, count, then check the slice."""
    r = fastcheck.decode_request(raw)
    if r is None:
        return None
    n = fastcheck.frames_used(r)
    if k + n > end:
        return None
    got = fastcheck.request_fields(r, list(frames[k:k + n]))
    return None if got is None else (k + n, got)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request(), st.integers(0, 3), st.integers(0, 2), st.integers(0, 2))
def test_request_at_is_the_three_calls_it_replaced(req, before, after, cut):
    raw, frames = req
    msg = [b"\0" * 3] * before + list(frames) + [b"\1" * 4] * after  # other requests' frames around it
    end = max(before, len(msg) - cut)
    assert repr(fastcheck.request_at(raw, msg, before, end)) == repr(three_calls(raw, msg, before, end))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=8), st.integers(1, 2**63 - 1), st.text(min_size=1, max_size=8),
                          st.none() | st.integers(0, 2**63 - 1), st.floats(0, 1e9) | st.integers(0, 2**40),
                          st.binary(max_size=40)), min_size=1, max_size=40))
def test_the_masters_packed_lists_are_codec_packs_bytes(rows):
    rows = [list(r) for r in rows]
    assert dispatch_one_packed(rows) == [pack(rows)]
    headers = [r[5] for r in rows]
    assert pack_rows(headers) == pack(headers)
