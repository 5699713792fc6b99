"""Security on real processes: for every socket and every command, a key of the wrong role, a
plaintext peer and an unknown key are refused (they get nothing and change nothing) while the
right role works; revocation and new keys take effect without a restart; rate limits; MAXMSGSIZE;
non-loopback plaintext binds refused."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
import zmq.auth

from ringserve.client import Client
from ringserve.client.admin import AdminClient
from ringserve.client.params import ParamClient
from ringserve.launch.procs import wait_until
from ringserve.master.ratelimit import RateLimiter
from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.shardrpc import ShardCallError
from ringserve.protocol.envelope import client_frames, request_body
from ringserve.protocol.messages import HEARTBEAT, READY, REPLY, DISCONNECT, SHARD_PROTO, WORKER_PROTO
from ringserve.protocol.security import (
    ROLES, Security, SecurityError, check_bind, create_identity, public_path, shard_command_roles,
    revoke_identity, secret_path,
)
from ringserve.worker import demo
from helpers import run_local

pytestmark = pytest.mark.timeout(240)

EPH = "tcp://127.0.0.1:*"
QUIET_S = 0.6  # how long a refused peer is watched for any answer (bounded)


# ------------------------------------------------------------------ helpers
@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    for role, names in (("master", ["m"]), ("shard", ["ps0"]), ("worker", ["w0", "w1"]), ("client", ["c1", "c2"]),
                        ("admin", ["a1"]), ("publisher", ["p1", "p2"])):
        for n in names:
            create_identity(d, role, n)
    return str(d)


def keypair(keys_dir: str, role: str, name: str) -> tuple[bytes, bytes]:
    return zmq.auth.load_certificate(secret_path(keys_dir, role, name))


def server_key(keys_dir: str, role: str, name: str) -> bytes:
    return zmq.auth.load_certificate(public_path(keys_dir, role, name))[0]


def first_name(keys_dir: str, role: str) -> str:
    return sorted(os.listdir(os.path.join(keys_dir, "secret", role)))[0].split(".")[0]


def peer(ctx, kind, address, who, keys_dir, server) -> zmq.Socket:
    """A raw socket as an attacker or a legitimate peer. who: 'plain', 'unknown' or a role name."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 5000)
    if who != "plain":
        pub, sec = zmq.curve_keypair() if who == "unknown" else keypair(keys_dir, who, first_name(keys_dir, who))
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = pub, sec, server
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(address)
    return sock


def send(sock: zmq.Socket, frames: list) -> None:
    """Never block: a peer whose handshake failed may have no pipe to queue on (that is refusal too)."""
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        pass


def got_nothing(sock: zmq.Socket, seconds: float = QUIET_S) -> bool:
    return not sock.poll(int(seconds * 1000))


def answered(socks: dict[str, zmq.Socket], seconds: float = QUIET_S) -> dict[str, zmq.Socket]:
    """got_nothing for several peers at once: every socket (each sent to before this is called) is
    watched for `seconds` from now, together rather than one after another; those that got
    anything, by name."""
    poller = zmq.Poller()
    for sock in socks.values():
        poller.register(sock, zmq.POLLIN)
    got: dict[str, zmq.Socket] = {}
    end = time.monotonic() + seconds
    while len(got) < len(socks) and (left := end - time.monotonic()) > 0:
        for sock, _ in poller.poll(max(1, int(left * 1000))):
            who = next(w for w, x in socks.items() if x is sock)
            got[who] = sock
            poller.unregister(sock)
    return got


def close_all(socks: dict[str, zmq.Socket]) -> None:
    for sock in socks.values():
        sock.close()


def attackers(allowed: set[str]) -> list[str]:
    return ["plain", "unknown", *[r for r in ROLES if r not in allowed]]


def start_secure(cluster, keys, workers=("w0",)):
    cluster.start_master("--keys", keys)
    for w in workers:
        cluster.start_workers(1, "--keys", keys, "--key-name", w, names=[w], wait=False)
    admin = AdminClient(cluster.admin, timeout=2.0, security=Security(keys, "admin"))
    wait_until(lambda: len(admin.status()["workers"]) == len(workers), 60, 0.1, "workers registered over CURVE")
    return admin


def start_shard(cluster, keys, name="ps0") -> dict:
    p = cluster._start("ringserve.launch.ps", ["--name", name, "--data-dir", str(cluster.tmp / name), "--bind", EPH,
                                               "--pub", EPH, "--announce-interval", "0.2", "--keys", keys], name)
    return p.info


def mlp_body(rid: str) -> list:
    return request_body(rid, {"x": np.ones((1, 256), np.float32)}, timeout_ms=5000)


# ------------------------------------------------------------------ master
def test_master_sockets_refuse_wrong_role_plaintext_and_unknown_keys(cluster, keys, zctx):
    admin = start_secure(cluster, keys)
    master_pub = server_key(keys, "master", "m")
    attempts = 0

    # client socket: only client keys; a request and an mmi.ping from anyone else get nothing
    socks = {who: peer(zctx, zmq.DEALER, cluster.frontend, who, keys, master_pub) for who in attackers({"client"})}
    for who, s in socks.items():
        send(s, client_frames("mlp", mlp_body(f"evil-{who}")))
        send(s, client_frames("mmi.ping", [b""]))
        attempts += 2
    assert answered(socks) == {}  # each watched QUIET_S after its sends, all at once
    close_all(socks)
    st = admin.status()
    assert st["models"].get("mlp", {}).get("requests", 0) == 0, st["models"]
    with Client(cluster.frontend, timeout=10, security=Security(keys, "client", "c1")) as c:
        assert c.infer("mlp", {"x": np.ones((1, 256), np.float32)})["logits"].shape == (1, 10)

    # worker socket: only worker keys; READY/HEARTBEAT/REPLY/DISCONNECT from anyone else change nothing
    before = [w["name"] for w in admin.status()["workers"]]
    socks = {who: peer(zctx, zmq.DEALER, cluster.master.info["backend"], who, keys, master_pub)
             for who in attackers({"worker"})}
    for who, s in socks.items():
        for cmd, header in ((READY, {"name": f"evil-{who}", "models": {"mlp": {"version": 0}}, "credit": 8}),
                            (HEARTBEAT, {}), (REPLY, {"id": "x", "attempt": 1, "ok": True}), (DISCONNECT, {})):
            send(s, [WORKER_PROTO, cmd, pack(header)])
            attempts += 1
    assert answered(socks) == {}
    close_all(socks)
    assert [w["name"] for w in admin.status()["workers"]] == before

    # admin socket: only admin keys; status and drain from anyone else get nothing and drain nothing
    socks = {who: peer(zctx, zmq.DEALER, cluster.admin, who, keys, master_pub) for who in attackers({"admin"})}
    for s in socks.values():
        send(s, [b"", pack({"cmd": "status"})])
        send(s, [b"", pack({"cmd": "drain", "worker": "w0"})])
        attempts += 2
    assert answered(socks) == {}
    close_all(socks)
    assert [w["state"] for w in admin.status()["workers"]] != ["draining"]
    assert attempts >= 40


# ------------------------------------------------------------------ shard
def test_shard_commands_are_authorized_per_role(cluster, keys, zctx):
    info = start_shard(cluster, keys)
    shard_pub = server_key(keys, "shard", "ps0")
    publisher = ParamClient({"ps0": info["endpoint"]}, timeout=10, security=Security(keys, "publisher", "p1"))
    try:
        state = {k: v.clone() for k, v in demo.mlp(seed=1).state_dict().items()}
        assert publisher.publish("mlp", state) == 1
        before = publisher.hello()["ps0"]
        attempts = 0
        commands = {  # label -> header; who may run each is shard_command_roles(header)
            "hello": {"cmd": "hello"}, "manifest": {"cmd": "fetch", "model": "mlp", "version": 1, "manifest_only": True},
            "fetch": {"cmd": "fetch", "model": "mlp", "version": 1},
            "stage": {"cmd": "stage", "model": "mlp", "version": 2, "pieces": []},
            "commit": {"cmd": "commit", "model": "mlp", "version": 2},
            "abort": {"cmd": "abort", "model": "mlp", "version": 1},
            "revert": {"cmd": "revert", "model": "mlp", "version": 2, "token": "t"},
            "rollback": {"cmd": "rollback", "model": "mlp", "version": 1},
        }
        socks = {who: peer(zctx, zmq.DEALER, info["endpoint"], who, keys, shard_pub)
                 for who in ["plain", "unknown", *ROLES]}  # everyone not allowed first: they must change nothing
        for who, s in socks.items():
            for cmd, header in commands.items():
                if who not in shard_command_roles(header):
                    send(s, [SHARD_PROTO, pack({"rid": cmd, **header})])
                    attempts += 1
        for who, s in answered(socks, 0.5).items():  # one quiet wait, every peer; an answer names its command
            pytest.fail(f"{who} got an answer to {unpack_map(s.recv_multipart()[-1]).get('rid')!r}")
        close_all(socks)
        after = publisher.hello()["ps0"]
        assert (after["seq"], after["current"], after["versions"]) == (before["seq"], before["current"],
                                                                       before["versions"])
        for who in ("worker", "publisher", "shard"):  # then the right roles: every command they may run works
            s = peer(zctx, zmq.DEALER, info["endpoint"], who, keys, shard_pub)
            for cmd, header in commands.items():
                if who in shard_command_roles(header):
                    s.send_multipart([SHARD_PROTO, pack({"rid": cmd, **header})])  # SNDTIMEO bounds it
                    assert s.poll(10_000), (who, cmd)
                    assert unpack_map(s.recv_multipart()[1])["rid"] == cmd
            s.close()
        assert publisher.publish("mlp", {k: v + 1 for k, v in state.items()}) == 2  # stage + commit still work
        assert publisher.hello()["ps0"]["versions"] == {"mlp": [1, 2]}
        assert attempts >= 30

        # PUB: workers hear announcements; nobody else gets anything
        socks = {who: peer(zctx, zmq.SUB, info["pub"], who, keys, shard_pub)
                 for who in ["plain", "unknown", *[r for r in ROLES if r != "worker"]]}
        assert answered(socks, 0.8) == {}  # announcements come every 0.2 s
        close_all(socks)
        s = peer(zctx, zmq.SUB, info["pub"], "worker", keys, shard_pub)
        assert s.poll(10_000) and unpack_map(s.recv_multipart()[1])["shard"] == "ps0"
        s.close()
    finally:
        publisher.close()


def test_secure_worker_takes_weights_from_secure_shard(cluster, keys):
    info = start_shard(cluster, keys)
    cluster.start_master("--keys", keys)
    with ParamClient({"ps0": info["endpoint"]}, security=Security(keys, "publisher", "p1")) as pc:
        pc.publish("mlp", {k: v.clone() for k, v in demo.mlp(seed=3).state_dict().items()})
    cluster.start_workers(1, "--keys", keys, "--key-name", "w0", "--paramservers", f"ps0={info['endpoint']}",
                          names=["w0"], wait=False)
    admin = AdminClient(cluster.admin, timeout=2.0, security=Security(keys, "admin"))
    wait_until(lambda: any(w["models"].get("mlp", {}).get("version") == 1 for w in admin.status()["workers"]),
               60, 0.1, "worker with v1 from the shard over CURVE")
    with Client(cluster.frontend, timeout=10, security=Security(keys, "client", "c1")) as c:
        assert c.infer_async("mlp", {"x": np.ones((1, 256), np.float32)}).result().version == 1


# ------------------------------------------------------------- revocation
def test_revoked_key_stops_working_and_new_key_works_without_restart(cluster, keys, zctx):
    start_secure(cluster, keys)
    info = start_shard(cluster, keys)
    master_pub = server_key(keys, "master", "m")
    # a client connected with c2 works, then c2 is revoked: the same connection and a new one get nothing
    c2 = zctx.socket(zmq.DEALER)
    c2.setsockopt(zmq.LINGER, 0)
    c2.curve_publickey, c2.curve_secretkey = keypair(keys, "client", "c2")
    c2.curve_serverkey = master_pub
    c2.connect(cluster.frontend)
    send(c2, client_frames("mmi.ping", [b""]))
    assert c2.poll(10_000)
    c2.recv_multipart()
    c2_keys = keypair(keys, "client", "c2")
    assert revoke_identity(keys, "client", "c2")
    time.sleep(0.5)  # the key ring is re-checked every 0.1 s
    send(c2, client_frames("mmi.ping", [b""]))
    assert got_nothing(c2), "revoked key still answered on its open connection"
    fresh = zctx.socket(zmq.DEALER)
    fresh.setsockopt(zmq.LINGER, 0)
    fresh.curve_publickey, fresh.curve_secretkey = c2_keys
    fresh.curve_serverkey = master_pub
    fresh.connect(cluster.frontend)
    send(fresh, client_frames("mmi.ping", [b""]))
    assert got_nothing(fresh), "revoked key accepted on a new connection"
    for sock in (c2, fresh):
        sock.close()

    # a key made after the master started works at once
    create_identity(keys, "client", "c3")
    with Client(cluster.frontend, timeout=10, security=Security(keys, "client", "c3")) as c:
        assert c.infer("mlp", {"x": np.ones((1, 256), np.float32)})["logits"].shape == (1, 10)

    # the same on the shard: a publisher's open connection stops working when its key is revoked
    p2 = ParamClient({"ps0": info["endpoint"]}, timeout=2, security=Security(keys, "publisher", "p2"))
    try:
        assert p2.hello()["ps0"]["name"] == "ps0"
        revoke_identity(keys, "publisher", "p2")
        time.sleep(0.5)
        with pytest.raises(ShardCallError):
            p2.rpc.call_all({"cmd": "stage", "model": "mlp", "version": 5, "pieces": []}, timeout=1.0)
    finally:
        p2.close()
    with ParamClient({"ps0": info["endpoint"]}, security=Security(keys, "publisher", "p1")) as p1:
        assert p1.hello()["ps0"]["versions"] == {}


# -------------------------------------------------- rate limit, size, binds
def test_rate_limit_answers_overloaded_with_retry_after(cluster, zctx):
    cluster.start_master("--rate-limit", "2", "--rate-burst", "2")
    s = peer(zctx, zmq.DEALER, cluster.frontend, "plain", "", b"")
    for i in range(6):
        send(s, client_frames("nope", mlp_body(f"r{i}")))
    replies = []
    end = time.monotonic() + 10
    while len(replies) < 6 and time.monotonic() < end:
        if s.poll(500):
            replies.append(unpack_map(s.recv_multipart()[-1]))
    limited = [r for r in replies if r.get("error", {}).get("code") == "OVERLOADED"]
    assert len(limited) >= 3, replies
    assert all(r["retry_after_s"] > 0 and r["id"].startswith("r") for r in limited)
    send(s, client_frames("mmi.ping", [b""]))  # the ping is never rate limited
    assert s.poll(5000)


def test_rate_limiter_is_a_bounded_token_bucket():
    rl = RateLimiter(rate=10, burst=2, max_keys=3)
    assert rl.take("a", 0.0) == 0 and rl.take("a", 0.0) == 0
    assert rl.take("a", 0.0) == pytest.approx(0.1)
    assert rl.take("a", 0.2) == 0  # refilled
    for k in "bcde":
        rl.take(k, 1.0)
    assert len(rl) == 3


def test_oversized_message_drops_the_peer_and_the_master_keeps_serving(cluster, zctx):
    cluster.start_master("--max-msg-bytes", "100000")
    big = peer(zctx, zmq.DEALER, cluster.frontend, "plain", "", b"")
    big.send_multipart(client_frames("mlp", [pack({"id": "big", "inputs": []}), b"\0" * 200_000]))
    assert got_nothing(big)
    s = peer(zctx, zmq.DEALER, cluster.frontend, "plain", "", b"")
    send(s, client_frames("mmi.ping", [b""]))
    assert s.poll(5000) and unpack_map(s.recv_multipart()[-1])["ok"]


def test_plaintext_non_loopback_bind_is_refused_unless_insecure():
    assert check_bind("tcp://127.0.0.1:5555", keys=False, insecure=False) is None
    assert check_bind("tcp://0.0.0.0:5555", keys=True, insecure=False) is None
    assert check_bind("inproc://x", keys=False, insecure=False) is None
    with pytest.raises(SecurityError):
        check_bind("tcp://0.0.0.0:5555", keys=False, insecure=False)
    with pytest.raises(SecurityError):
        check_bind("tcp://eth0:5555", keys=False, insecure=False)
    assert "INSECURE" in check_bind("tcp://0.0.0.0:5555", keys=False, insecure=True)
    out = subprocess.run([sys.executable, "-m", "ringserve.launch.master", "--frontend", "tcp://0.0.0.0:*"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--insecure" in out.stderr


def test_keys_cli_writes_secret_0600_and_revokes(tmp_path):
    d = tmp_path / "k"
    out = subprocess.run([sys.executable, "-m", "ringserve.launch.keys", str(d), "new", "worker", "a", "b"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(os.stat(secret_path(d, "worker", "a")).st_mode) == 0o600
    assert public_path(d, "worker", "b").exists()
    out = subprocess.run([sys.executable, "-m", "ringserve.launch.keys", str(d), "revoke", "worker", "a"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not public_path(d, "worker", "a").exists()
    with pytest.raises(SecurityError):
        create_identity(d, "wizard", "x")


def test_local_cluster_secure(tmp_path):
    """ringserve-local --secure: fresh keys, every role over CURVE, the same main job."""
    rc, stdout, stderr = run_local("--secure", "--requests", "2", "--workers", "1", "--shards", "1",
                                   "--workdir", str(tmp_path))
    assert rc == 0, stderr[-2000:]
    assert "CURVE keys in" in stdout and "mlp v2" in stdout
    assert stat.S_IMODE(os.stat(secret_path(tmp_path / "keys", "master", "master")).st_mode) == 0o600
    assert '"auth_refused"' not in (tmp_path / "master.log").read_text()
