"""Unauthorized attempts on every socket and command, and CURVE vs plaintext throughput; one JSON line.

A CURVE cluster (a shard, a master, one worker) with keys for every role. For every bound
socket (client, worker, admin, shard commands, shard PUB), every command, and every peer not
allowed there (plaintext, unknown key, each wrong role), one attempt: it counts as accepted if
anything comes back or the master's/shard's state changed. Then the MLP with batching (32) is
driven closed-loop through a plaintext cluster and a CURVE one, alternately, in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import zmq
import zmq.auth

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import closed_loop  # noqa: E402
from ringserve.client import Client  # noqa: E402
from ringserve.client.admin import AdminClient  # noqa: E402
from ringserve.client.params import ParamClient  # noqa: E402
from ringserve.launch.logsetup import configure_logging  # noqa: E402
from ringserve.launch.procs import RoleProcess, wait_until  # noqa: E402
from ringserve.protocol.codec import pack  # noqa: E402
from ringserve.protocol.envelope import client_frames, request_body  # noqa: E402
from ringserve.protocol.messages import DISCONNECT, HEARTBEAT, READY, REPLY, SHARD_PROTO, WORKER_PROTO  # noqa: E402
from ringserve.protocol.security import (  # noqa: E402
    DOMAIN_ROLES, ROLES, Security, shard_command_roles, create_identity, public_path, secret_path,
)
from ringserve.worker import demo  # noqa: E402

EPH = "tcp://127.0.0.1:*"
X = np.ones((1, 256), np.float32)


def make_keys(d: Path) -> str:
    for role in ROLES:
        create_identity(d, role, "shard0" if role == "shard" else "one")
    return str(d)


def start_cluster(tmp: Path, keys: str | None, label: str, worker_args=()) -> tuple[list, dict]:
    flags = ["--keys", keys] if keys else []
    procs = []
    master = RoleProcess("ringserve.launch.master", ["--frontend", EPH, "--backend", EPH, "--admin", EPH,
                                                     "--log-level", "warning", *flags], tmp / f"{label}-master.log")
    procs.append(master)
    procs.append(RoleProcess("ringserve.launch.worker", [
        "--master", master.info["backend"], "--model", "mlp=ringserve.worker.demo:mlp", "--threads",
        str(os.environ.get("RS_THREADS", 1)), "--log-level", "warning", *flags, *worker_args],
        tmp / f"{label}-worker.log"))
    admin = AdminClient(master.info["admin"], 2.0, Security(keys, "admin") if keys else None)
    wait_until(lambda: admin.status()["workers"], 60, 0.1, "worker")
    return procs, {**master.info, "admin_client": admin}


def attacker(ctx, kind, address, who, keys, server_pub) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if who != "plain":
        pub, sec = zmq.curve_keypair() if who == "unknown" else zmq.auth.load_certificate(
            secret_path(keys, who, "shard0" if who == "shard" else "one"))
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = pub, sec, server_pub
    if kind == zmq.SUB:
        s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(address)
    return s


def try_once(s: zmq.Socket, frames: list | None, wait_ms: int) -> bool:
    """True if anything came back (an unauthorized attempt was accepted)."""
    if frames is not None:
        try:
            s.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass
    return bool(s.poll(wait_ms))


def attack(tmp: Path, keys: str, wait_ms: int) -> tuple[int, int]:
    shard = RoleProcess("ringserve.launch.ps", ["--name", "shard0", "--data-dir", str(tmp / "shard0"), "--bind", EPH,
                                                "--pub", EPH, "--announce-interval", "0.2", "--keys", keys,
                                                "--log-level", "warning"], tmp / "shard.log")
    procs, m = start_cluster(tmp, keys, "attack")
    procs.append(shard)
    ctx = zmq.Context()
    attempts = accepted = 0
    try:
        with ParamClient({"shard0": shard.info["endpoint"]}, security=Security(keys, "publisher")) as pc:
            pc.publish("mlp", {k: v.clone() for k, v in demo.mlp(seed=1).state_dict().items()})
            shard_before = pc.hello()["shard0"]
            master_pub = zmq.auth.load_certificate(public_path(keys, "master", "one"))[0]
            shard_pub = zmq.auth.load_certificate(public_path(keys, "shard", "shard0"))[0]
            st0 = m["admin_client"].status()
            sockets = {
                "master.client": (m["frontend"], master_pub, zmq.DEALER,
                                  [client_frames("mlp", request_body("evil", {"x": X})),
                                   client_frames("mmi.ping", [b""])]),
                "master.worker": (m["backend"], master_pub, zmq.DEALER,
                                  [[WORKER_PROTO, READY, pack({"name": "evil", "models": {"mlp": {}}, "credit": 9})],
                                   [WORKER_PROTO, HEARTBEAT, pack({})], [WORKER_PROTO, DISCONNECT, pack({})],
                                   [WORKER_PROTO, REPLY, pack({"id": "evil", "attempt": 1, "ok": True})]]),
                "master.admin": (m["admin"], master_pub, zmq.DEALER,
                                 [[b"", pack({"cmd": "status"})], [b"", pack({"cmd": "drain", "worker": "*"})]]),
            }
            for domain, (address, server, kind, messages) in sockets.items():
                for who in ["plain", "unknown", *[r for r in ROLES if r not in DOMAIN_ROLES[domain]]]:
                    s = attacker(ctx, kind, address, who, keys, server)
                    for msg in messages:
                        attempts += 1
                        accepted += try_once(s, msg, wait_ms)
                    s.close()
            commands = {"hello": {}, "fetch": {"model": "mlp", "version": 1},
                        "stage": {"model": "mlp", "version": 9, "pieces": []}, "commit": {"model": "mlp", "version": 9},
                        "abort": {"model": "mlp", "version": 1}, "rollback": {"model": "mlp", "version": 1},
                        "revert": {"model": "mlp", "version": 9, "token": "t"}}
            for who in ["plain", "unknown", *ROLES]:
                s = attacker(ctx, zmq.DEALER, shard.info["endpoint"], who, keys, shard_pub)
                for cmd, header in commands.items():
                    if who not in shard_command_roles({"cmd": cmd, **header}):
                        attempts += 1
                        accepted += try_once(s, [SHARD_PROTO, pack({"cmd": cmd, **header})], wait_ms)
                s.close()
            for who in ["plain", "unknown", *[r for r in ROLES if r not in DOMAIN_ROLES["shard.pub"]]]:
                s = attacker(ctx, zmq.SUB, shard.info["pub"], who, keys, shard_pub)
                attempts += 1
                accepted += try_once(s, None, max(wait_ms, 500))  # announcements every 0.2 s
                s.close()
            shard_after = pc.hello()["shard0"]
            accepted += (shard_after["seq"], shard_after["versions"]) != (shard_before["seq"], shard_before["versions"])
            st1 = m["admin_client"].status()
            accepted += [w["name"] for w in st1["workers"]] != [w["name"] for w in st0["workers"]]
            accepted += any(w["state"] == "draining" for w in st1["workers"])
            accepted += st1["models"].get("mlp", {}).get("requests", 0) != st0["models"].get("mlp", {}).get("requests", 0)
    finally:
        ctx.destroy(linger=0)
        for p in reversed(procs):
            p.stop()
    return attempts, accepted


def throughput(tmp: Path, keys: str | None, label: str, seconds: float, concurrency: int) -> float:
    procs, m = start_cluster(tmp, keys, label, ["--max-batch-size", "32", "--max-queue-delay-us", "2000"])
    try:
        with Client(m["frontend"], timeout=30, security=Security(keys, "client") if keys else None) as c:
            closed_loop(c, "mlp", lambda: {"x": X}, concurrency, min(0.5, seconds))  # warm-up
            return closed_loop(c, "mlp", lambda: {"x": X}, concurrency, seconds)[0]
    finally:
        for p in reversed(procs):
            p.stop()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=4.0, help="measurement time per throughput run")
    p.add_argument("--rounds", type=int, default=2, help="plain/CURVE pairs (alternating, averaged)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--wait-ms", type=int, default=200, help="how long each refused attempt is watched")
    args = p.parse_args(argv)
    configure_logging("bench", "warning")  # logs to stderr: stdout is the one JSON line
    tmp = Path(tempfile.mkdtemp(prefix="rs-authz-"))
    keys = make_keys(tmp / "keys")
    attempts, accepted = attack(tmp, keys, args.wait_ms)
    plain, curve = [], []
    for i in range(args.rounds):
        plain.append(throughput(tmp, None, f"plain{i}", args.seconds, args.concurrency))
        curve.append(throughput(tmp, keys, f"curve{i}", args.seconds, args.concurrency))
    r = {"attempts": attempts, "unauthorized_accepted": accepted,
         "plain_req_per_s": round(sum(plain) / len(plain), 1), "curve_req_per_s": round(sum(curve) / len(curve), 1),
         "curve_vs_plain_throughput": round(sum(curve) / sum(plain), 3), "rounds": args.rounds,
         "concurrency": args.concurrency, "model": "mlp, --max-batch-size 32"}
    print(json.dumps(r))


if __name__ == "__main__":
    main()
