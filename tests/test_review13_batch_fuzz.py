"""Review of issue 22's coalesced client path (review13): a seeded fuzz of whole client batches
against a real Broker (its loop pumped by hand, a fake worker on a real socket). Each batch mixes
good requests, requests a check refuses (nil data, a lying byte count, a bad version, a bad dtype),
unknown models, a resend of an id already in the message, and maybe a last entry whose tensor list
breaks the framing. Every id gets exactly one answer, and the right kind: a good one its result,
a refused one its error, each neighbour untouched; only the entries after a break go unanswered,
with one id-less error for the batch."""
from __future__ import annotations

import random

import pytest

from ringserve.protocol.codec import pack
from ringserve.protocol.envelope import batch_frames, batch_frames_packed, parse_dispatch, request_body, split_replies
from ringserve.protocol.messages import MDP_CLIENT, REQUEST, WORKER_PROTO
from test_master_robustness import X, dealer, pump, register, reply_ok

pytestmark = pytest.mark.timeout(120)

BAD = {  # kind -> (header fields besides the id, the error code the master answers)
    "nil": ({"inputs": [["x", "float32", [1, 4], None]]}, "BAD_REQUEST"),
    "short": ({"inputs": [["x", "float32", [1, 4], b"\0" * 15]]}, "BAD_REQUEST"),
    "version": ({"inputs": [["x", "float32", [1, 4], X.tobytes()]], "version": -1}, "BAD_REQUEST"),
    "dtype": ({"inputs": [["x", "float99", [1, 4], X.tobytes()]]}, "BAD_REQUEST"),
    "timeout": ({"inputs": [["x", "float32", [1, 4], X.tobytes()]], "timeout_ms": 0}, "BAD_REQUEST"),
}


def _batch(rng: random.Random, n: int, tag: str) -> tuple[list, dict, list, bool]:
    """(entries, id -> expected code ("ok" or an error code), ids never answered, whether it breaks)."""
    entries, want, silent = [], {}, []
    goods: list[str] = []
    for i in range(n):
        rid = f"{tag}-{i}"
        kind = rng.choice(["good", "good", "good", "unknown", "dup", *BAD])
        if kind == "good" or (kind == "dup" and not goods):
            entries.append((b"mlp", request_body(rid, {"x": X})))
            want[rid] = "ok"
            goods.append(rid)
        elif kind == "dup":  # a resend of an id this message holds already: never run or answered twice
            entries.append((b"mlp", request_body(rng.choice(goods), {"x": X})))
        elif kind == "unknown":
            entries.append((b"nobody", request_body(rid, {"x": X})))
            want[rid] = "UNKNOWN_MODEL"
        else:
            fields, code = BAD[kind]
            entries.append((b"mlp", [pack({"id": rid, **fields})]))
            want[rid] = code
    breaks = rng.random() < 0.3
    if breaks:  # a last entry whose tensor list names a frame the message does not carry
        rid = f"{tag}-break"
        entries.append((b"mlp", [pack({"id": rid, "inputs": [["x", "float32", [1, 4]]]})]))
        silent.append(rid)
    return entries, want, silent, breaks


@pytest.mark.parametrize("packed", [True, False])
def test_every_request_of_a_fuzzed_batch_gets_exactly_its_one_answer(broker, packed):
    rng = random.Random(22 if packed else 23)
    w = register(broker, b"w", credit=8)
    client = dealer(broker, "frontend")
    service = b"mmi.batch2" if packed else b"mmi.batch"
    for round_ in range(25):
        entries, want, silent, breaks = _batch(rng, rng.randint(1, 10), f"r{round_}{'p' if packed else 'u'}")
        frames = batch_frames_packed(entries) if packed else batch_frames(entries)
        client.send_multipart([b"", MDP_CLIENT, service, *frames])
        got: dict[str, list] = {}
        batch_errors = []

        def step():
            while w.poll(0):
                msg = w.recv_multipart()
                if msg[:2] == [WORKER_PROTO, REQUEST]:
                    for d in parse_dispatch(msg[2:]):
                        reply_ok(w, {"id": d.cid, "key": d.key, "attempt": d.attempt, "version": d.version})
            while client.poll(0):
                msg = client.recv_multipart()
                assert msg[:3] == [b"", MDP_CLIENT, service], msg[:3]
                for _, header, _ in split_replies(msg[3:]):
                    if header.get("id") is None:
                        batch_errors.append(header)
                    else:
                        got.setdefault(header["id"], []).append(header)
            return set(got) >= set(want) and len(batch_errors) == int(breaks)

        pump(broker, step, timeout=10)
        pump(broker, timeout=0.15)  # anything more would come now
        step()
        assert set(got) == set(want), (sorted(set(got) ^ set(want)), entries)
        for rid, answers in got.items():
            assert len(answers) == 1, (rid, answers)  # exactly one answer per id, a dup included
            code = "ok" if answers[0].get("ok") else answers[0]["error"]["code"]
            assert code == want[rid], (rid, answers[0])
        assert not set(silent) & set(got)
        assert len(batch_errors) == int(breaks) and all(e["error"]["code"] == "BAD_REQUEST" for e in batch_errors)
    assert not broker.pending and not broker.held  # the books are empty: nothing left waiting
    client.close(linger=0)
    w.close(linger=0)
