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
