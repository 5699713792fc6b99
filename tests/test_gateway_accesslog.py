"""gateway/accesslog.py: the access line as structlog would render it, kept as bytes and written in
batches (a byte bound, the owner's periodic flush), str lines from structlog too, a failing file
dropping the batch without raising."""
from __future__ import annotations

import io
import json
import threading

import pytest

from ringserve.gateway.accesslog import MAX_BYTES, AccessLog, BufferedLines

pytestmark = pytest.mark.timeout(30)


def test_lines_wait_for_flush_then_come_out_whole_and_in_order():
    out = io.StringIO()
    sink = BufferedLines(out)
    log = AccessLog(sink, {"role": "gateway"})
    log.info("http_request", status=200, path="/v2/models/m/infer", request_id="gw1-0", ms=1.5)
    sink.msg('{"event":"from_structlog"}')  # structlog hands str lines
    assert out.getvalue() == ""  # nothing written per line
    sink.flush()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["http_request", "from_structlog"]
    first = lines[0]
    assert first["role"] == "gateway" and first["level"] == "info" and first["status"] == 200
    assert first["timestamp"].endswith("Z") and len(first["timestamp"]) == len("2026-12-01T15:21:46.065057Z")


def test_byte_bound_flushes_without_waiting_and_is_thread_safe():
    out = io.StringIO()
    sink = BufferedLines(out)
    log = AccessLog(sink)
    per = MAX_BYTES // 100 + 10  # more than the bound over all threads

    def burst() -> None:
        for k in range(per):
            log.info("http_request", k=k, pad="x" * 40)

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out.getvalue()  # the bound wrote some before any flush
    sink.flush()
    assert len(out.getvalue().splitlines()) == 4 * per
    assert sink.pending == 0


def test_a_failing_file_drops_the_batch_and_serving_goes_on():
    class Broken(io.StringIO):
        def write(self, s):
            raise OSError("disk full")

    sink = BufferedLines(Broken())
    AccessLog(sink).info("http_request", status=200)
    sink.flush()  # no exception
    assert sink.pending == 0


def test_disabled_log_keeps_nothing():
    sink = BufferedLines(io.StringIO())
    AccessLog(sink, enabled=False).info("http_request", status=200)
    assert sink.pending == 0


@pytest.mark.parametrize("context", [{"role": "gateway"}, {}, {"role": "gateway", "model": "bound"}])
def test_the_per_route_http_line_is_byte_for_byte_the_generic_one(monkeypatch, context):
    """AccessLog.http_request renders what info("http_request", ...) renders, for paths, ids and
    models that need escaping, any status and ms, across second boundaries, with the route's parts
    taken from its cache the second time; a bound key that is also a field takes the long way."""
    import ringserve.gateway.accesslog as accesslog

    fast_out, slow_out = io.StringIO(), io.StringIO()
    fast_sink, slow_sink = BufferedLines(fast_out), BufferedLines(slow_out)
    fast, slow = AccessLog(fast_sink, context), AccessLog(slow_sink, context)
    cases = [("POST", "/v2/models/mlp/infer", 200, 1.234, "gw0a-1", None, None, "mlp"),
             ("GET", '/v2/"q"\u00e9\n\\', 404, 0.001, "gw0a-2", 'id "x"\u2028', "t1", None),
             ("POST", "/x", 500, 12345.678, "gw0a-3", "", None, "m\x00"),
             ("HEAD", "/v2", 503, 0.0, "gw0a-4", "7", "tenant.b", "mlp")]
    for now in (1.5e9 + 0.123456, 1.7e9 + 0.999999, 1.7e9 + 1.0000004):
        monkeypatch.setattr(accesslog.time, "time", lambda now=now: now)
        for _ in range(2):
            for method, path, status, ms, rid, oid, tenant, model in cases:
                fast.http_request(method, path, status, ms, rid, oid, tenant, model)
                slow.info("http_request", method=method, path=path, status=status, ms=ms, request_id=rid, id=oid,
                          tenant=tenant, model=model)
    fast_sink.flush()
    slow_sink.flush()
    assert fast_out.getvalue() == slow_out.getvalue()
    assert fast_out.getvalue().count("\n") == 3 * 2 * len(cases)  # (splitlines would also split at U+2028)
    AccessLog(fast_sink, context, enabled=False).http_request(*cases[0])
    assert fast_sink.pending == 0
