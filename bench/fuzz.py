"""Fuzz every socket a peer can reach and check the promises in docs/ still hold.

Targets: ``client`` (the master's frontend), ``worker`` (the master's worker port, as a fake
worker), ``admin`` (the master's admin port), ``shard`` (a parameter server), ``agent``
(a real worker, fed by a fake master) and ``replies`` (the master's worker port as a registered
worker would use it: real client requests answered with mutated REPLY batches — wrong keys and
attempts, versions never announced, duplicates, silence, garbage — after which every request has
exactly one answer and the master's credit books balance: ``credit_leaked`` 0). Messages are seeded mutations of valid ones: corrupted
msgpack after a valid prefix, absurd shapes, wrong dtypes, lying byte counts, 10 MB frames,
non-UTF-8 names, missing and extra frames. Afterwards every process must be alive, a good
request must still succeed and every message that deserves an answer must have had one.

    python bench/fuzz.py [--count 20000] [--seed 1] [--targets client,worker,admin,shard,agent,replies]

prints one JSON line: sent, crashes, unanswered, credit_leaked, max_rss_growth_mb (and per-target figures).
The test suite (tests/test_fuzz.py) runs the same code with ~2,000 messages per socket.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import zmq

from ringserve.launch.procs import RoleProcess, wait_for_workers
from ringserve.protocol.codec import pack, unpack
from ringserve.protocol.envelope import parse_dispatch, reply_key, request_body, split_replies
from ringserve.protocol.messages import (
    DISCONNECT, HEARTBEAT, MDP_CLIENT, READY, REPLY, REQUEST, SHARD_PROTO, WORKER_PROTO,
)

TARGETS = ("client", "worker", "admin", "shard", "agent", "replies")
EPHEMERAL = "tcp://127.0.0.1:*"
BIG = 10 * 1024 * 1024
WINDOW = 64  # messages in flight on the windowed targets
ROW = np.arange(3, dtype=np.float32)

ABSURD_SHAPES = [[0, 2 ** 63], [2 ** 63], [2 ** 62, 2 ** 62], [-1, 3], [1.5, 3], ["3"], [[2]], [1] * 9, None,
                 {}, [True, 3], [2 ** 31, 2 ** 31, 2 ** 31], [], [0], [0, 3], [1, 0], "1,3"]
WRONG_DTYPES = [["float32"], {"float32": 1}, "complex64", "uint32", "object", 5, None, b"\xff", "float32\x00",
                "", "<f4", "F" * 1000]
ODD_NAMES = [b"\xff\xfe", "", "x" * 5000, "\u00e9\u4e2d", b"\x00", 7, None, ["x"], "echo\x00"]


# ----------------------------------------------------------------- mutations
def corrupt(rng: random.Random, body: bytes) -> bytes:
    """A valid prefix, then something that is not msgpack (or not what it claims to be)."""
    kind = rng.randrange(5)
    if kind == 0 and len(body) > 1:
        return body[:rng.randrange(1, len(body))]
    if kind == 1:
        b = bytearray(body)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 2:
        return body + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    if kind == 3:
        return b"\xc1" + body
    return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))


def nested(depth: int) -> bytes:
    """msgpack for [[[...nil...]]], `depth` deep, built by hand (packb refuses deep nesting)."""
    return b"\x91" * depth + b"\xc0"


def odd_value(rng: random.Random):
    return rng.choice([float("nan"), float("inf"), -1, 2 ** 64 - 1, -2 ** 63, "x", b"\xff", [], {}, None, True,
                       1e308, {"a": {"b": [1, 2]}}])


def tensor_request(rng: random.Random, rid, rows: int = 1) -> tuple[dict, list]:
    x = np.tile(ROW, (rows, 1))
    return {"id": rid, "inputs": [["x", "float32", [rows, 3]]], "timeout_ms": 10_000}, [x.tobytes()]


def mutate_request(rng: random.Random, rid) -> tuple[object, list, str]:
    """(header or raw bytes, data frames, kind) for one mutated inference request."""
    header, data = tensor_request(rng, rid, rng.randrange(1, 4))
    kind = rng.choice(["valid", "corrupt", "shape", "dtype", "bytes", "big", "names", "fields", "frames"])
    if kind == "corrupt":
        return corrupt(rng, pack(header)), data, kind
    if kind == "shape":
        header["inputs"][0][2] = rng.choice(ABSURD_SHAPES)
        data = [rng.choice([b"", data[0], b"\x00" * rng.randrange(64)])]
    elif kind == "dtype":
        header["inputs"][0][1] = rng.choice(WRONG_DTYPES)
    elif kind == "bytes":  # the header lies about the size of the frame
        data = [data[0][:-rng.randrange(1, 8)] if rng.random() < 0.5 else data[0] + b"\x00" * rng.randrange(1, 8)]
    elif kind == "big":
        if rng.random() < 0.02:  # a few real 10 MB frames, honest or not
            n = BIG // 4 - rng.randrange(2)
            header["inputs"] = [["x", "float32", [BIG // 12, 3]]]
            data = [b"\x00" * (4 * n)]
        else:
            header["inputs"][0][2] = [2 ** 20, 3]
    elif kind == "names":
        header["inputs"][0][0] = rng.choice(ODD_NAMES)
    elif kind == "fields":
        header[rng.choice(["timeout_ms", "version", "attempt", "inputs", "model"])] = odd_value(rng)
    elif kind == "frames":
        data = rng.choice([[], data * 2, data + [b"junk"]])
        if rng.random() < 0.3:
            header["inputs"] = [[f"x{i}", "float32", [1, 3]] for i in range(200)]
    return header, data, kind


def _raw(h) -> bytes:
    return h if isinstance(h, bytes) else pack(h)


def client_message(rng: random.Random, n: int) -> tuple[list, bool]:
    rid = f"c{n}"
    roll = rng.random()
    if roll < 0.08:  # broken envelopes
        return rng.choice([[b"garbage"], [b""], [b"", b"MDPC02", b"echo", b"x"], [b"", MDP_CLIENT],
                           [b"", MDP_CLIENT, b"echo"], [b"", MDP_CLIENT, b"\xff\xfe", b"\x80"],
                           [b"", MDP_CLIENT, b"x" * 300, pack({"id": rid})]]), True
    if roll < 0.12:  # internal services with odd bodies
        return [b"", MDP_CLIENT, rng.choice([b"mmi.service", b"mmi.ping", b"mmi.nope"]),
                rng.choice([b"echo", b"\xff", b"", b"x" * 10000, pack({"id": rid})])], True
    service = b"echo" if roll < 0.9 else rng.choice([b"\xff\xfe", b"nope", "\u00e9".encode(), b""])
    header, data, _ = mutate_request(rng, rid)
    return [b"", MDP_CLIENT, service, _raw(header), *data], True


GOOD_READY = {"name": "fz", "models": {"echo": {"version": None, "ready": True}}, "credit": 4,
              "device": "cpu", "pid": 1, "weight": 1.0}


def acceptable_ready(body: bytes) -> bool:
    """Would a correct master register this READY? (Then no DISCONNECT is owed.)"""
    try:
        info = unpack(body)
    except Exception:
        return False
    if not isinstance(info, dict):
        return False
    models, credit, weight = info.get("models"), info.get("credit", 1), info.get("weight", 1.0)
    return (isinstance(models, dict) and bool(models) and all(isinstance(k, str) and isinstance(v, dict)
                                                               for k, v in models.items())
            and isinstance(credit, int) and not isinstance(credit, bool) and 1 <= credit <= 10_000
            and isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
            and weight > 0)


def worker_message(rng: random.Random, n: int) -> tuple[list, bool]:
    """A message a fake worker sends the master; each, from a fresh peer, is owed a DISCONNECT."""
    roll = rng.random()
    if roll < 0.15:
        return rng.choice([[b"junk"], [WORKER_PROTO], [WORKER_PROTO, b"\x99"], [WORKER_PROTO, b""],
                           [b"RSW02", READY, pack(GOOD_READY)], [WORKER_PROTO, READY],
                           [WORKER_PROTO, HEARTBEAT, pack({})], [WORKER_PROTO, REPLY],
                           [WORKER_PROTO, REPLY, b"\xc1"], [WORKER_PROTO, REPLY, pack({"ok": True})]]), True
    if roll < 0.5:
        body = corrupt(rng, pack(GOOD_READY))
        return [WORKER_PROTO, READY, body], not acceptable_ready(body)
    info = dict(GOOD_READY)
    field = rng.choice(["models", "credit", "weight", "models", "big"])
    if field == "models":
        info["models"] = rng.choice([{"echo": 5}, {"echo": None}, {"echo": [1]}, {b"echo": {}}, [], "no", {},
                                     {"echo": {"version": "x"}}, {str(i): 1 for i in range(1000)}, None])
    elif field == "credit":
        info["credit"] = rng.choice([0, -1, 2 ** 64 - 1, float("nan"), "3", None, [], 1e9, True])
    elif field == "weight":
        info["weight"] = rng.choice([float("nan"), float("inf"), -1.0, 0, "x", None, [1]])
    else:
        return [WORKER_PROTO, READY, pack(GOOD_READY) + b"\x00" * BIG if rng.random() < 0.01
                else nested(rng.randrange(100, 2000))], True
    body = pack(info)
    return [WORKER_PROTO, READY, body], not acceptable_ready(body)


def admin_message(rng: random.Random, n: int) -> tuple[list, bool]:
    roll = rng.random()
    if roll < 0.1:
        body = pack({"cmd": "status"})
    elif roll < 0.3:
        body = corrupt(rng, pack({"cmd": rng.choice(["status", "drain"]), "worker": "nobody"}))
    elif roll < 0.4:
        body = nested(rng.choice([10, 100, 1000, 5000]))
    elif roll < 0.5:
        body = pack(rng.choice([[1, 2], "status", 5, None, {"cmd": None}]))
    elif roll < 0.51:
        body = b"\x00" * BIG
    else:
        body = pack({"cmd": rng.choice(["drain", "explode", "\u00e9", "", "status\x00", "rollback"]),
                     "worker": rng.choice(["nobody", b"\xff", 5, None, ["w0"], {"a": 1}, "x" * 5000])})
    frames = rng.choice([[b"", body], [body], [b"", body], [b"", b"", body]])
    return frames, True


def shard_message(rng: random.Random, n: int) -> tuple[list, bool]:
    roll = rng.random()
    if roll < 0.08:
        return rng.choice([[b"junk"], [SHARD_PROTO], [b"RSP02", pack({"cmd": "hello"})], [b""]]), True
    cmd = rng.choice(["hello", "fetch", "stage", "commit", "abort", "rollback", "nope", None, 5])
    header: dict = {"cmd": cmd, "rid": n, "model": rng.choice(["m", "", b"\xff", 5, None, "x" * 5000, "../x"]),
                    "version": rng.choice([1, 2, -1, 0, 2 ** 63, "1", None, 1.5])}
    frames: list = []
    if cmd == "stage":
        size = rng.choice([0, 4, 16, 1000])
        piece = ["w", "float32", [size // 4], 0, size // 4, rng.choice([0, 1, 2 ** 62]), "00" * 32]
        header["pieces"] = rng.choice([[piece], [piece[:3]], "x", [[None] * 7], [piece, piece]])
        frames = [b"\x00" * (BIG if rng.random() < 0.01 else size)]
    elif cmd == "fetch":
        header.update(rng.choice([{}, {"manifest_only": True}, {"keys": ["a", 5, None]}, {"keys": "abc"}]))
    body = pack(header) if rng.random() < 0.7 else corrupt(rng, pack(header))
    return [SHARD_PROTO, body, *frames], True


# ----------------------------------------------------------------- drivers
def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def windowed(ctx, address: str, gen: Callable, count: int, seed: int, alive: Callable[[], bool],
             budget_s: float) -> dict:
    """One DEALER; every message is owed exactly one reply; counts replies against messages sent."""
    rng = random.Random(seed)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 5000)
    sock.connect(address)
    sent = owed = got = given_up = 0
    end = time.monotonic() + budget_s

    def take(timeout_ms: int) -> bool:
        nonlocal got
        if sock.poll(timeout_ms, zmq.POLLIN):
            while True:
                try:
                    sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    got += 1
                except zmq.Again:
                    return True
        return False

    try:
        for n in range(count):
            frames, deserves = gen(rng, n)
            try:
                sock.send_multipart(frames)
            except zmq.Again:
                break
            sent += 1
            owed += deserves
            take(0)
            stalled_at = time.monotonic()
            while owed - got - given_up >= WINDOW and time.monotonic() < end and alive():
                if take(200):
                    stalled_at = time.monotonic()
                elif time.monotonic() - stalled_at > 2.0:  # no answer for 2 s: count these lost, go on
                    given_up = owed - got
            if time.monotonic() >= end or not alive():
                break
        quiet_until = time.monotonic() + 15
        while got < owed and time.monotonic() < min(quiet_until, end + 15) and alive():
            if take(200):
                quiet_until = time.monotonic() + 15
    finally:
        sock.close(linger=0)
    return {"sent": sent, "owed": owed, "answered": got, "unanswered": max(owed - got, 0)}


def fresh_peers(ctx, address: str, gen: Callable, count: int, seed: int, alive: Callable[[], bool],
                budget_s: float, batch: int = 50) -> dict:
    """A fresh DEALER per message (so one peer's state never changes what the next is owed);
    a deserving message is owed a DISCONNECT from the master."""
    rng = random.Random(seed)
    sent = owed = answered = 0
    end = time.monotonic() + budget_s
    n = 0
    while n < count and time.monotonic() < end and alive():
        socks = []
        for _ in range(min(batch, count - n)):
            frames, deserves = gen(rng, n)
            n += 1
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(address)
            s.send_multipart(frames)
            socks.append([s, deserves, False])
            sent += 1
            owed += deserves
        poller = zmq.Poller()
        for s, _, _ in socks:
            poller.register(s, zmq.POLLIN)
        wait_end = time.monotonic() + 10
        while any(d and not a for _, d, a in socks) and time.monotonic() < wait_end and alive():
            for s, _ in poller.poll(200):
                for entry in socks:
                    if entry[0] is s:
                        while True:
                            try:
                                msg = s.recv_multipart(zmq.NOBLOCK)
                            except zmq.Again:
                                break
                            if msg[:2] == [WORKER_PROTO, DISCONNECT]:
                                entry[2] = True
        answered += sum(1 for _, d, a in socks if d and a)
        for s, _, _ in socks:
            s.close(linger=0)
    return {"sent": sent, "owed": owed, "answered": answered, "unanswered": owed - answered}


def fake_master(ctx, worker: RoleProcess, router: zmq.Socket, count: int, seed: int, budget_s: float) -> dict:
    """Feed a real worker mutated REQUESTs; every one whose header carries an id is owed a REPLY."""
    rng = random.Random(seed)
    ident = None
    owed: set = set()
    answered: set = set()
    kinds: dict = {}
    sent = 0
    end = time.monotonic() + budget_s
    last_beat = 0.0

    def pump(timeout_ms: int) -> None:
        nonlocal ident, last_beat
        now = time.monotonic()
        if ident is not None and now - last_beat > 0.3:
            try:
                router.send_multipart([ident, WORKER_PROTO, HEARTBEAT, pack({"epoch": "fuzz"})])
            except zmq.ZMQError:  # the worker reconnected under a new identity: its READY tells us
                pass
            last_beat = now
        if not router.poll(timeout_ms, zmq.POLLIN):
            return
        while True:
            try:
                msg = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(msg) >= 3 and msg[2] == READY:
                ident = msg[0]
            elif len(msg) >= 4 and msg[2] == REPLY:  # one or more replies
                try:
                    for _, reply, _ in split_replies(msg[3:]):
                        rid = reply_key(reply)  # the worker answers by the master's key
                        answered.add(rid if isinstance(rid, str) else repr(rid))
                except Exception:
                    pass

    while ident is None and time.monotonic() < end and worker.alive():
        pump(200)
    for n in range(count):
        if ident is None or time.monotonic() >= end or not worker.alive():
            break
        rid = f"a{n}"
        header, data, kind = mutate_request(rng, rid)
        entry = [rid, 1, "echo", None, 30000.0]  # the routing fields: mutated where the header's are
        if isinstance(header, dict):
            for i, key in ((1, "attempt"), (2, "model"), (3, "version"), (4, "timeout_ms")):
                if key in header:
                    entry[i] = header.pop(key)
        # Owed an answer whatever its header and frames: the dispatch list (with its key) is readable,
        # and a worker answers every entry it cannot split by key (protocol.envelope.parse_dispatch).
        deserves = isinstance(entry[0], str) and 0 < len(entry[0]) <= 128
        try:
            router.send_multipart([ident, WORKER_PROTO, REQUEST, pack([entry]), _raw(header), *data])
        except (zmq.ZMQError, TypeError, ValueError):  # a value msgpack cannot pack: not sent
            pump(200)
            continue
        sent += 1
        if deserves:
            owed.add(rid)
            kinds[rid] = kind
        pump(0)
        while len(owed - answered) >= WINDOW and time.monotonic() < end and worker.alive():
            pump(200)
    quiet_until = time.monotonic() + 15
    while owed - answered and time.monotonic() < quiet_until and worker.alive():
        before = len(answered)
        pump(200)
        if len(answered) != before:
            quiet_until = time.monotonic() + 15
    # a good request still succeeds
    good = False
    if ident is not None and worker.alive():
        header, data = tensor_request(rng, "good", 2)
        router.send_multipart([ident, WORKER_PROTO, REQUEST, pack([["good", 1, "echo", None, 30000.0]]), pack(header),
                               *data])
        good_end = time.monotonic() + 15
        while "good" not in answered and time.monotonic() < good_end and worker.alive():
            pump(200)
        good = "good" in answered
    return {"sent": sent, "owed": len(owed), "answered": len(owed & answered),
            "unanswered": len(owed - answered), "good_ok": good,
            "unanswered_kinds": sorted({kinds[r] for r in owed - answered})}


REPLY_MUTATIONS = ("good", "good", "good", "good", "wrong_key", "wrong_attempt", "bad_version", "no_version",
                   "odd_error", "short_outputs", "extra_frames", "duplicate", "silence", "garbage", "not_a_map",
                   "another_id", "huge_attempt")


def mutated_replies(rng: random.Random, d, out: bytes) -> tuple[list, str]:
    """Frames of what a hostile or broken worker answers to one dispatched request."""
    kind = rng.choice(REPLY_MUTATIONS)
    good = {"id": d.cid, "key": d.key, "attempt": d.attempt, "ok": True, "version": 1,
            "outputs": [["y", "float32", [1, 3], out]]}
    if kind in ("good", "duplicate"):
        frames = [pack(good)] * (2 if kind == "duplicate" else 1)
    elif kind == "wrong_key":
        frames = [pack({**good, "key": rng.choice(["nope", d.key + "x", "", 7, "k" * 200])})]
    elif kind == "wrong_attempt":
        frames = [pack({**good, "attempt": rng.choice([d.attempt + 1, 0, -1, "1", None])})]
    elif kind == "huge_attempt":
        frames = [pack({**good, "attempt": 2 ** 63 - 1})]
    elif kind == "bad_version":
        frames = [pack({**good, "version": rng.choice([2, 10 ** 12, -1, "1", [1], 1.0])})]
    elif kind == "no_version":
        frames = [pack({k: v for k, v in good.items() if k != "version"})]
    elif kind == "odd_error":
        frames = [pack({"id": d.cid, "key": d.key, "attempt": d.attempt, "ok": False,
                        "error": rng.choice([{"code": "NOPE", "message": 5}, {"code": "TIMEOUT", "message": "x"},
                                             "boom", None])})]
    elif kind == "short_outputs":
        frames = [pack({**good, "outputs": [["y", "float32", [1, 3]]]})]  # says a frame follows; none does
    elif kind == "extra_frames":
        frames = [pack(good), b"\0" * 12]
    elif kind == "another_id":
        frames = [pack({**good, "id": "someone-else"})]
    elif kind == "garbage":
        frames = [b"\xc1" + pack(good)[1:]]
    elif kind == "not_a_map":
        frames = [pack([good])]
    else:  # silence: the request's deadline must give the slot back
        frames = []
    return frames, kind


def fake_worker_replies(ctx, backend: str, frontend: str, count: int, seed: int, alive: Callable[[], bool],
                        budget_s: float, credit: int = 8) -> dict:
    """A registered fake worker answers real requests with mutated REPLY batches; a raw client (no
    resends) counts answers per id: each request is owed exactly one."""
    rng = random.Random(seed)
    worker = ctx.socket(zmq.DEALER)
    client = ctx.socket(zmq.DEALER)
    for sock in (worker, client):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 5000)
    worker.connect(backend)
    client.connect(frontend)
    ready = [WORKER_PROTO, READY, pack({"name": "fz-replies", "credit": credit,
                                        "models": {"echo": {"version": 1, "ready": True}}})]
    worker.send_multipart(ready)
    out = ROW.tobytes()
    answers: dict[str, int] = {}
    kinds: dict[str, int] = {}
    sent = registrations = 0
    end = time.monotonic() + budget_s
    last_beat = time.monotonic()

    def pump(timeout_ms: int) -> None:
        nonlocal registrations, last_beat
        poller = zmq.Poller()
        poller.register(worker, zmq.POLLIN)
        poller.register(client, zmq.POLLIN)
        events = dict(poller.poll(timeout_ms))
        if time.monotonic() - last_beat > 0.2:
            worker.send_multipart([WORKER_PROTO, HEARTBEAT, pack({})])
            last_beat = time.monotonic()
        while client in events:
            try:
                msg = client.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            header = unpack(msg[3]) if len(msg) > 3 else {}
            if isinstance(header, dict) and not header.get("ack") and isinstance(header.get("id"), str):
                answers[header["id"]] = answers.get(header["id"], 0) + 1
        while worker in events:
            try:
                msg = worker.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if msg[:2] == [WORKER_PROTO, DISCONNECT]:  # evicted for a bad message: register again
                registrations += 1
                worker.send_multipart(ready)
            elif msg[:2] == [WORKER_PROTO, REQUEST]:
                batch: list = []
                for d in parse_dispatch(msg[2:]):
                    frames, kind = mutated_replies(rng, d, out)
                    kinds[kind] = kinds.get(kind, 0) + 1
                    batch.extend(frames)
                    if rng.random() < 0.5 and batch:  # sometimes one REPLY per request, sometimes coalesced
                        worker.send_multipart([WORKER_PROTO, REPLY, *batch])
                        batch = []
                if batch:
                    worker.send_multipart([WORKER_PROTO, REPLY, *batch])

    try:
        for n in range(count):
            if time.monotonic() >= end or not alive():
                break
            body = request_body(f"q{n}", {"x": ROW.reshape(1, 3)}, timeout_ms=rng.choice([300.0, 1000.0, 3000.0]))
            client.send_multipart([b"", MDP_CLIENT, b"echo", *body])
            sent += 1
            pump(0)
            while sent - len(answers) >= WINDOW and time.monotonic() < end and alive():
                pump(100)
        quiet_until = time.monotonic() + 10
        while len(answers) < sent and time.monotonic() < quiet_until and alive():
            pump(100)
        settle_until = time.monotonic() + 5  # replies still on the wire are late replies: let them land
        while time.monotonic() < settle_until and alive():
            pump(100)
    finally:
        worker.close(linger=0)
        client.close(linger=0)
    return {"sent": sent, "owed": sent, "answered": len(answers), "unanswered": sent - len(answers),
            "duplicated": sum(c - 1 for c in answers.values()), "re_registrations": registrations,
            "reply_kinds": kinds}


def admin_books(admin: str) -> dict:
    from ringserve.client.admin import AdminClient

    return AdminClient(admin).status()["books"]


def good_inference(frontend: str) -> bool:
    from ringserve.client import Client

    try:
        with Client(frontend, timeout=20) as c:
            out = c.infer("echo", {"x": np.ones((2, 3), np.float32)})
        return bool(np.array_equal(out["y"], np.ones((2, 3), np.float32)))
    except Exception as exc:  # reported as a failed good request
        print(f"good request failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return False


def role(module: str, args: list[str], tmp: Path, label: str, procs: list) -> RoleProcess:
    p = RoleProcess(module, args, tmp / f"{label}.log", wait_ready=False)
    procs.append(p)
    p.wait_ready(90)
    return p


def run_target(target: str, count: int, seed: int, tmp: Path, budget_s: float = 300.0) -> dict:
    """Start what `target` needs, fuzz it, check it; every process started here is stopped here."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}")
    tmp.mkdir(parents=True, exist_ok=True)
    procs: list[RoleProcess] = []
    ctx = zmq.Context()
    try:
        worker_args = ["--threads", "1", "--heartbeat-interval", "0.2", "--model", "echo=ringserve.worker.demo:noop",
                       "--max-batch-size", "8"]
        if target == "agent":
            router = ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            router.setsockopt(zmq.SNDTIMEO, 5000)
            router.bind(EPHEMERAL)
            endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
            worker = role("ringserve.launch.worker", ["--master", endpoint, "--name", "fz0", *worker_args,
                                                      "--heartbeat-interval", "1.0"], tmp, "worker", procs)
            before = {p.pid: rss_mb(p.pid) for p in procs}
            try:
                res = fake_master(ctx, worker, router, count, seed, budget_s)
            finally:
                router.close(linger=0)
        elif target == "shard":
            shard = role("ringserve.launch.ps", ["--name", "ps0", "--data-dir", str(tmp / "ps0"), "--bind", EPHEMERAL,
                                                 "--pub", EPHEMERAL, "--announce-interval", "0.2"], tmp, "shard", procs)
            before = {p.pid: rss_mb(p.pid) for p in procs}
            res = windowed(ctx, shard.info["endpoint"], shard_message, count, seed, shard.alive, budget_s)
            res["good_ok"] = _shard_hello(ctx, shard.info["endpoint"])
        else:
            master = role("ringserve.launch.master", ["--frontend", EPHEMERAL, "--backend", EPHEMERAL, "--admin",
                                                      EPHEMERAL, "--heartbeat-interval", "0.2"], tmp, "master", procs)
            role("ringserve.launch.worker", ["--master", master.info["backend"], "--name", "w0", *worker_args],
                 tmp, "worker", procs)
            wait_for_workers(master.info["admin"], 1, timeout=60)
            before = {p.pid: rss_mb(p.pid) for p in procs}
            if target == "client":
                res = windowed(ctx, master.info["frontend"], client_message, count, seed, master.alive, budget_s)
            elif target == "replies":
                res = fake_worker_replies(ctx, master.info["backend"], master.info["frontend"], count, seed,
                                          master.alive, budget_s)
            elif target == "admin":
                res = windowed(ctx, master.info["admin"], admin_message, count, seed, master.alive, budget_s)
            else:
                res = fresh_peers(ctx, master.info["backend"], worker_message, count, seed, master.alive, budget_s)
            res["good_ok"] = master.alive() and good_inference(master.info["frontend"])
            if master.alive():  # the credit invariant once nothing is left in flight
                books = admin_books(master.info["admin"])
                res["books"] = books
                res["credit_leaked"] = books["leaked"] + max(0, books["in_flight"] - books["assigned"])
        time.sleep(0.5)
        res["crashes"] = sum(not p.alive() for p in procs)
        res["crashed"] = [p.log_path.name for p in procs if not p.alive()]
        growth = {p.log_path.stem: round(rss_mb(p.pid) - before.get(p.pid, 0.0), 1) for p in procs if p.alive()}
        res["rss_growth_by_process_mb"] = growth
        res["rss_growth_mb"] = max(growth.values(), default=0.0)
        res["target"] = target
        return res
    finally:
        for p in reversed(procs):
            p.stop(timeout=3)
        ctx.destroy(linger=0)


def _shard_hello(ctx, endpoint: str) -> bool:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send_multipart([SHARD_PROTO, pack({"cmd": "hello", "rid": "good"})])
        if not s.poll(10_000):
            return False
        reply = unpack(s.recv_multipart()[1])
        return bool(reply.get("ok"))
    finally:
        s.close(linger=0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=20_000, help="messages per socket (default 20000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--budget", type=float, default=900.0, help="seconds per target at most (default 900)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks stop the roles
    results = []
    with tempfile.TemporaryDirectory(prefix="ringserve-fuzz-") as tmp:
        for t in args.targets.split(","):
            r = run_target(t, args.count, args.seed, Path(tmp) / t, args.budget)
            print(json.dumps(r), file=sys.stderr)
            results.append(r)
    print(json.dumps({"sent": sum(r["sent"] for r in results), "crashes": sum(r["crashes"] for r in results),
                      "unanswered": sum(r["unanswered"] for r in results),
                      "credit_leaked": sum(r.get("credit_leaked", 0) for r in results),
                      "duplicated": sum(r.get("duplicated", 0) for r in results),
                      "max_rss_growth_mb": max(r["rss_growth_mb"] for r in results),
                      "good_ok": all(r["good_ok"] for r in results), "count_per_socket": args.count,
                      "seed": args.seed, "targets": {r["target"]: {k: v for k, v in r.items() if k != "target"}
                                                     for r in results}}))


if __name__ == "__main__":
    main()
