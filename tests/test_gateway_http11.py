"""gateway/http11.py, the gateway's HTTP/1.1 server, on real sockets (127.0.0.1, ephemeral port)
with a small app of the shape GatewayApp has (on_head / on_body / body_failed): what HTTP/1.1 asks
of it beyond what tests/test_gateway*.py see through the real app (pipelining order, 100-continue,
HEAD, keep-alive, limits, malformed bytes, the connection bound, a graceful stop)."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from ringserve.gateway.http11 import JOIN_BELOW, HttpServer
from ringserve.gateway.server import bind

pytestmark = pytest.mark.timeout(30)


class EchoApp:
    """/now answers from the headers; /echo?D answers the body after D ms; /big a large body."""

    max_body_bytes = 1000
    body_timeout_s = 0.5

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None

    def on_head(self, req):
        if req.path == "/now":
            return 200, [(b"content-type", b"text/plain")], [b"now"]
        if req.path == "/big":
            return 200, [], [b"a" * (JOIN_BELOW + 10), b"b" * 10]
        if req.path == "/boom":
            raise RuntimeError("an app bug")
        return None

    def on_body(self, req, body, reply):
        delay = int(req.query or b"0") / 1000
        self.loop.call_later(delay, reply, 200, [], [b"echo:" + body])

    def body_failed(self, req, status, reply):
        if req.path == "/failboom":
            raise RuntimeError("an app bug refusing a body")
        reply(status, [], [b"failed"])


@pytest.fixture()
def served():
    app = EchoApp()
    server = HttpServer(app, max_connections=3, keep_alive_s=0.6, drain_s=5.0)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    app.loop = loop
    done = threading.Event()

    def run():
        try:
            loop.run_until_complete(server.serve([sock]))
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    for _ in range(200):  # bounded: it starts in milliseconds
        if server.started:
            break
        time.sleep(0.01)
    yield server, port
    server.should_exit = True
    assert done.wait(10)
    loop.close()
    sock.close()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def read_response(s: socket.socket, buf: bytearray, head_only: bool = False) -> tuple[bytes, dict, bytes]:
    """One response from `s` (bytes left over stay in `buf`): status line, headers, body."""
    for _ in range(1000):
        if b"\r\n\r\n" in buf:
            break
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    length = 0 if head_only else int(headers.get(b"content-length", b"0"))
    del buf[:len(head) + 4]
    for _ in range(1000):
        if len(buf) >= length:
            break
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    body = bytes(buf[:length])
    del buf[:length]
    return lines[0], headers, body


def closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n" % (path.encode(), len(body), extra) + body


def test_pipelined_requests_are_answered_in_order_even_when_the_first_finishes_last(served):
    _, port = served
    with connect(port) as s:
        s.sendall(post("/echo?300", b"first") + b"GET /now HTTP/1.1\r\nHost: t\r\n\r\n" + post("/echo?0", b"third"))
        buf = bytearray()
        bodies = [read_response(s, buf)[2] for _ in range(3)]
        assert bodies == [b"echo:first", b"now", b"echo:third"]
        s.sendall(post("/echo", b"again"))  # the connection is still usable
        status, headers, body = read_response(s, buf)
        assert status.startswith(b"HTTP/1.1 200") and body == b"echo:again" and b"connection" not in headers


def test_expect_100_continue_head_and_large_bodies(served):
    _, port = served
    with connect(port) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"data")
        buf = bytearray()
        assert read_response(s, buf)[2] == b"echo:data"
        s.sendall(b"HEAD /now HTTP/1.1\r\nHost: t\r\n\r\nGET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = read_response(s, buf, head_only=True)  # a length, and no body bytes:
        assert status.startswith(b"HTTP/1.1 200") and headers[b"content-length"] == b"3"
        status, headers, body = read_response(s, buf)  # what follows is the next response, whole
        assert status.startswith(b"HTTP/1.1 200") and body == b"a" * (JOIN_BELOW + 10) + b"b" * 10


def test_malformed_bytes_get_400_and_close_and_an_app_bug_gets_500(served):
    _, port = served
    with connect(port) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, headers, _ = read_response(s, bytearray())
        assert status.startswith(b"HTTP/1.1 400") and headers[b"connection"] == b"close"
        assert closed(s)
    with connect(port) as s:
        s.sendall(b"GET /boom HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = read_response(s, bytearray())
        assert status.startswith(b"HTTP/1.1 500") and closed(s)


def test_body_limits_size_and_time(served):
    _, port = served
    with connect(port) as s:  # a chunked body that grows past the limit: 413 and close
        chunk = b"200\r\n" + b"x" * 512 + b"\r\n"  # and, in the same read, the body's end and a next request
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3
                  + b"0\r\n\r\nGET /now HTTP/1.1\r\nHost: t\r\n\r\n")
        buf = bytearray()
        status, headers, body = read_response(s, buf)
        assert status.startswith(b"HTTP/1.1 413") and headers[b"connection"] == b"close" and body == b"failed"
        assert not buf and closed(s)  # one answer, then the close: nothing for what came after
    with connect(port) as s:  # half a body, then silence: 408 within the body timeout (+ the sweep)
        t0 = time.monotonic()
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhalf")
        status, _, _ = read_response(s, bytearray())
        assert status.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 3


def test_keep_alive_closes_idle_connections_and_the_bound_refuses_more(served):
    server, port = served
    with connect(port) as s:
        s.sendall(b"GET /now HTTP/1.1\r\nHost: t\r\n\r\n")
        read_response(s, bytearray())
        t0 = time.monotonic()
        assert closed(s)  # idle past keep_alive_s (0.6 s, swept every 0.25 s)
        assert 0.4 < time.monotonic() - t0 < 3
    for _ in range(100):  # bounded: the server forgets the closed connection at once
        if not server.connections:
            break
        time.sleep(0.02)
    held = [connect(port) for _ in range(3)]
    try:
        for s in held:
            s.sendall(b"GET /now HTTP/1.1\r\nHost: t\r\n\r\n")
            read_response(s, bytearray())
        with connect(port) as extra:
            status, _, _ = read_response(extra, bytearray())
            assert status.startswith(b"HTTP/1.1 503")
    finally:
        for s in held:
            s.close()


def test_graceful_stop_finishes_the_request_in_flight_then_refuses(served):
    server, port = served
    with connect(port) as s:
        s.sendall(post("/echo?500", b"late"))
        time.sleep(0.1)
        server.should_exit = True
        status, headers, body = read_response(s, bytearray())
        assert body == b"echo:late" and headers[b"connection"] == b"close"
        assert closed(s)
    for _ in range(100):  # bounded: the listening socket closes within one sweep
        try:
            with connect(port) as s:
                s.sendall(b"GET /now HTTP/1.1\r\nHost: t\r\n\r\n")
                if closed(s):
                    break
        except OSError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("still serving after the stop")


def test_a_pipelined_request_answered_from_its_head_is_answered_while_its_body_is_unsent(served):
    """A request taken from the queue that the app answers from its head alone (its body still to come,
    reading paused behind the requests before it) is answered and closed, not left waiting forever."""
    _, port = served
    with connect(port) as s:
        partial = b"POST /now HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
        s.sendall(post("/echo?300", b"first") + b"GET /now HTTP/1.1\r\nHost: t\r\n\r\n" + partial)
        buf = bytearray()
        bodies = [read_response(s, buf)[2] for _ in range(2)]
        assert bodies == [b"echo:first", b"now"]
        status, headers, body = read_response(s, buf)
        assert status.startswith(b"HTTP/1.1 200") and body == b"now" and headers.get(b"connection") == b"close"
        assert closed(s)


def test_a_head_past_the_limit_is_refused_and_closed(served):
    """Request line and headers are bounded in bytes (one endless header line, or endless headers),
    even while another request is in flight: the parser buffers no more than the limit."""
    _, port = served
    with connect(port) as s:
        s.sendall(post("/echo?2000", b"first") + b"GET /now HTTP/1.1\r\nHost: t\r\nX-Long: ")
        for _ in range(16):  # 1 MiB of one header line, far past the limit, while "first" is in flight
            s.sendall(b"a" * 65536)
        buf = bytearray()
        _, headers, body = read_response(s, buf)
        assert body == b"echo:first" and headers.get(b"connection") == b"close"
        assert closed(s)
    with connect(port) as s:  # many short headers, nothing else in flight
        s.sendall(b"GET /now HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(10000)))
        buf = bytearray()
        status, headers, _ = read_response(s, buf)
        assert status.startswith(b"HTTP/1.1 431") and headers.get(b"connection") == b"close"
        assert closed(s)


def test_an_app_bug_refusing_a_slow_body_is_answered_500_and_the_server_keeps_serving(served):
    """body_failed raising (from the sweeper's 408, or from a 413 while parsing) is answered 500 and
    closed; it neither ends the sweeper (and with it the server) nor leaves the request unanswered."""
    _, port = served
    with connect(port) as s:
        s.sendall(b"POST /failboom HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nab")  # then silence: 408
        status, headers, _ = read_response(s, bytearray())
        assert status.startswith(b"HTTP/1.1 500") and headers.get(b"connection") == b"close"
    with connect(port) as s:
        s.sendall(b"POST /failboom HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000)  # 413
        status, headers, _ = read_response(s, bytearray())
        assert status.startswith(b"HTTP/1.1 500") and headers.get(b"connection") == b"close"
    time.sleep(0.6)  # a few sweeps
    with connect(port) as s:
        s.sendall(b"GET /now HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s, bytearray())[2] == b"now"
