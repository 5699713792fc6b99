"""One fact, one check: which model names a master takes (protocol.envelope.is_model_name). The
client refuses at submit exactly the names the master would answer with no id (empty, too long) or
as an RFC 8 "mmi." service; hypothesis feeds both sides the same random names, and the master's
side is a real Broker answering one request of that name inside a client batch."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringserve.client.reliable import new_pending
from ringserve.master import broker as broker_mod
from ringserve.protocol import envelope
from ringserve.protocol.envelope import MAX_NAME_LEN, batch_frames_packed, is_model_name, request_body, split_replies
from ringserve.protocol.messages import MDP_CLIENT
from test_master_robustness import X, dealer, pump

pytestmark = pytest.mark.timeout(120)

NAMES = (st.text(max_size=4) | st.sampled_from(["", "mmi.", "mmi.batch2", "mmi.service", "mlp", "mmi"])
         | st.integers(MAX_NAME_LEN - 2, MAX_NAME_LEN + 2).map(lambda n: "m" * n)
         | st.text(min_size=1, max_size=3).map(lambda s: "mmi." + s))
_IDS = itertools.count()


def test_the_master_and_the_client_use_the_one_rule():
    assert broker_mod.is_model_name is envelope.is_model_name


@settings(max_examples=200, deadline=None)
@given(NAMES)
def test_the_client_refuses_at_submit_exactly_the_names_the_rule_refuses(name):
    try:
        new_pending("r1", name, {"x": X}, 1.0, 0.5, 0.5, None, None, None)
        refused = False
    except ValueError:
        refused = True
    assert refused == (not is_model_name(name))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(NAMES.filter(lambda n: len(n.encode()) <= 4 * MAX_NAME_LEN))
def test_the_master_answers_with_the_id_exactly_the_names_the_rule_takes(broker, name):
    """A name the rule takes is a model's (unknown here: UNKNOWN_MODEL, with the request's id); any
    other is answered without it (an id-less BAD_REQUEST, or the MMI reply of an "mmi." name)."""
    client = dealer(broker, "frontend")
    try:
        rid = f"n{next(_IDS)}"
        client.send_multipart([b"", MDP_CLIENT, b"mmi.batch2",
                               *batch_frames_packed([(name.encode(), request_body(rid, {"x": X}))])])
        got: list = []

        def answered():
            while client.poll(0):
                got.append(client.recv_multipart())
            return got

        assert pump(broker, answered), f"no answer for {name!r}"
        frames = got[0]
        assert frames[:2] == [b"", MDP_CLIENT]
        if name.startswith("mmi.") and frames[2] == name.encode() and frames[3].isdigit():
            ids = []  # an "mmi." name's MMI reply (RFC 8: its service, then a status code such as b"501")
        else:
            assert frames[2] == b"mmi.batch2", frames[:4]
            ids = [h.get("id") for _, h, _ in split_replies(frames[3:])]
        assert (rid in ids) == is_model_name(name), (name, frames[:4])
    finally:
        client.close(linger=0)
