"""A REQUEST send that raises (a bug in packing a turn's requests for one worker) must not leave
those requests assigned, unsent, until their deadlines, nor stop the turn's other sends: each is
answered INTERNAL at once, its worker slot given back, and the master goes on serving."""
from __future__ import annotations

import pytest

from test_master_robustness import answer, dealer, next_request, recv, register, reply_ok, request

pytestmark = pytest.mark.timeout(60)


def test_a_send_that_raises_answers_its_requests_and_the_master_keeps_serving(broker, monkeypatch):
    w = register(broker, b"w", credit=4)
    client = dealer(broker, "frontend")
    real = broker._send_requests

    def broken(w, reqs):  # a bug in packing one turn's requests for this worker
        if any(r.rid.startswith("boom") for r in reqs):
            raise RuntimeError("packing bug")
        return real(w, reqs)

    monkeypatch.setattr(broker, "_send_requests", broken)
    request(client, "boom-1", timeout_ms=30_000)
    got = answer(recv(broker, client, timeout=5.0))  # now, not at the 30 s deadline
    assert got["id"] == "boom-1" and got["ok"] is False and got["error"]["code"] == "INTERNAL"
    assert broker.books()["leaked"] == 0 and broker.books()["in_flight"] == 0 and not broker.pending

    request(client, "fine-1", timeout_ms=30_000)  # the next request is served as usual
    hdr = next_request(broker, w)
    assert hdr["id"] != "" and hdr["attempt"] == 1
    reply_ok(w, hdr)
    ok = answer(recv(broker, client))
    assert ok["id"] == "fine-1" and ok["ok"] is True
    assert broker.books()["leaked"] == 0 and not broker.pending
    client.close(linger=0)
    w.close(linger=0)
