"""The client survives whatever callers and the network do (issue 10, items 3, 12, 13).

A test ROUTER stands in for the master where only the client is under test; a small TCP proxy
between a real client and a real master cuts the connection for the reconnect test.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest
import zmq

from ringserve.client import Client, Timeout
from ringserve.launch.procs import wait_until
from ringserve.protocol.codec import pack, unpack_map

pytestmark = pytest.mark.timeout(120)

X = {"x": np.ones((1, 4), np.float32)}


class FakeMaster:
    """A ROUTER the test drives by hand: receive a request, answer (or not) as the test says."""

    def __init__(self, ctx: zmq.Context):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 5000)
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def next_request(self) -> tuple[bytes, dict]:
        """The next model request (pings are answered), as (routing id, header)."""
        for _ in range(200):
            ident, _, _, service, header, *_ = self.sock.recv_multipart()
            if service == b"mmi.ping":
                self.answer(ident, service, {"ok": True, "epoch": "e1"})
                continue
            return ident, unpack_map(header)
        raise AssertionError("no request came")

    def answer(self, ident: bytes, service: bytes, header: dict, *frames: bytes) -> None:
        self.sock.send_multipart([ident, b"", b"MDPC01", service, pack({"epoch": "e1", **header}), *frames])

    def answer_ok(self, ident: bytes, rid: str) -> None:
        self.answer(ident, b"echo", {"id": rid, "ok": True, "outputs": [["y", "float32", [1]]]},
                    np.ones(1, np.float32).tobytes())


@pytest.fixture
def fake_master(zctx):
    fm = FakeMaster(zctx)
    yield fm
    fm.sock.close(linger=0)


def test_cancelled_future_does_not_kill_the_io_thread(fake_master):
    """Item 12: an answer for a cancelled future used to raise InvalidStateError in the I/O thread."""
    with Client(fake_master.address, timeout=10, grace=0.5) as c:
        first = c.infer_async("echo", X)
        ident, hdr = fake_master.next_request()
        assert first.cancel()
        fake_master.answer_ok(ident, hdr["id"])  # the answer arrives after the caller gave up
        second = c.infer_async("echo", X)
        ident, hdr2 = fake_master.next_request()
        fake_master.answer_ok(ident, hdr2["id"])
        assert second.result(timeout=5).outputs["y"].tolist() == [1.0]
        assert c._thread.is_alive()


def test_asyncio_wait_for_timeout_then_infer_still_works(fake_master):
    """Item 12 as a user meets it: asyncio.wait_for cancels the wrapped future."""
    with Client(fake_master.address, timeout=10, grace=0.5) as c:
        async def give_up():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(c.ainfer("echo", X), 0.2)

        asyncio.run(give_up())
        ident, hdr = fake_master.next_request()
        fake_master.answer_ok(ident, hdr["id"])  # too late: its future is cancelled
        fut = c.infer_async("echo", X)
        ident, hdr2 = fake_master.next_request()
        fake_master.answer_ok(ident, hdr2["id"])
        assert fut.result(timeout=5).outputs["y"].tolist() == [1.0]


def test_infer_never_waits_past_timeout_plus_grace(fake_master):
    """After a caller cancels a future, a master that never answers: infer() raises Timeout in bounds."""
    with Client(fake_master.address, timeout=10, grace=0.3) as c:
        cancelled = c.infer_async("echo", X)
        ident, hdr = fake_master.next_request()
        cancelled.cancel()
        fake_master.answer_ok(ident, hdr["id"])
        result: list = []

        def call():
            t0 = time.monotonic()
            try:
                c.infer("echo", X, timeout=0.5)
            except Timeout:
                result.append(time.monotonic() - t0)

        t = threading.Thread(target=call, daemon=True)
        t.start()
        t.join(10)
        assert result, "infer() did not return Timeout in bounded time"
        assert result[0] < 0.5 + 0.3 + 2.0  # a bound on waiting, generous for a busy machine


def test_reused_request_id_is_refused(fake_master):
    """Item 13: a second request under an id still in flight orphaned the first future."""
    with Client(fake_master.address, timeout=10) as c:
        first = c.infer_async("echo", X, request_id="same")
        with pytest.raises(ValueError, match="already in flight"):
            c.infer_async("echo", X, request_id="same")
        ident, hdr = fake_master.next_request()
        assert hdr["id"] == "same"
        fake_master.answer_ok(ident, "same")
        assert first.result(timeout=5).outputs["y"].tolist() == [1.0]
        again = c.infer_async("echo", X, request_id="same")  # answered: the id may be used again
        ident, hdr = fake_master.next_request()
        fake_master.answer_ok(ident, "same")
        assert again.result(timeout=5).id == "same"


class TcpProxy:
    """Forwards 127.0.0.1 TCP to a target; `cut()` drops every live connection (a network blip)."""

    def __init__(self, target: str):
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.stopped = False
        self.accepted = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                down, _ = self.listener.accept()
            except OSError:
                continue
            up = socket.create_connection(self.target, timeout=5)
            up.settimeout(None)
            with self.lock:
                self.conns += [down, up]
                self.accepted += 1
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.stopped = True
        self.cut()
        self.listener.close()
        self.thread.join(5)


def test_tcp_drop_without_master_restart_loses_nothing(cluster):
    """Item 3: after a reconnect the client resends what is unanswered; the master answers the new socket."""
    cluster.start_master()
    cluster.start_workers(1, "--credit", "4", model="echo=ringserve.worker.demo:slow,arg.delay=0.5")
    proxy = TcpProxy(cluster.frontend)
    try:
        with Client(proxy.address, timeout=30, retry_interval=0.2) as c:
            assert c.infer("echo", X)["y"].tolist() == X["x"].tolist()
            futures = [c.infer_async("echo", {"x": np.full((1, 4), float(i), np.float32)}) for i in range(8)]
            wait_until(lambda: c.stats.sent >= 9 and len(c._pending) == 8, 10, what="requests sent")
            time.sleep(0.2)  # and taken in by the master, which runs them 4 at a time
            proxy.cut()  # the master does not restart; only the TCP connection goes
            for i, f in enumerate(futures):
                assert f.result(timeout=20).outputs["y"][0, 0] == i
            assert c.stats.reconnects >= 1
    finally:
        proxy.close()
    assert cluster.master.alive()


def test_garbage_from_the_master_never_stops_the_client(fake_master):
    """Seeded junk on the client's socket (bad frames, corrupt msgpack, lying outputs): later answers still land."""
    import random

    rng = random.Random(7)
    with Client(fake_master.address, timeout=10) as c:
        fut = c.infer_async("echo", X, request_id="victim")
        ident, _ = fake_master.next_request()
        junk = [pack({"id": "victim", "ok": True, "outputs": [["y", ["float32"], [1]]]}),
                pack({"id": "victim", "ok": True, "outputs": [["y", "float32", [0, 2**63]]]}),
                pack({"id": ["victim"], "ok": False, "error": 5}), pack({"id": "victim", "ack": True, "epoch": 7}),
                pack({"epoch": {"x": 1}}), pack([1, 2]), b"\xc1\xc1", b""]
        for _ in range(300):
            choice = rng.randrange(3)
            if choice == 0:
                fake_master.sock.send_multipart([ident, *[rng.randbytes(rng.randrange(8)) for _ in range(rng.randrange(1, 5))]])
            elif choice == 1:
                fake_master.sock.send_multipart([ident, b"", b"MDPC01", b"echo", rng.choice(junk)])
            else:
                good = bytearray(pack({"id": "nobody", "ok": True, "outputs": [["y", "float32", [1]]]}))
                good[rng.randrange(len(good))] = rng.randrange(256)
                fake_master.sock.send_multipart([ident, b"", b"MDPC01", b"echo", bytes(good), b"\0" * 3])
        fake_master.answer_ok(ident, "victim")
        reply = fut.result(timeout=10)
        assert reply.id == "victim" and reply.outputs["y"].tolist() == [1.0]
        assert c._thread.is_alive()
