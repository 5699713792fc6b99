"""ringserve-local: a whole cluster on this machine, on an embedded default.

Starts parameter-server shards, a master and N workers serving the demo MLP and CNN.
Publishes v1 of both models (weights from a fixed seed) to the shards; the workers start
with no weights and take them from the shards. Sends real requests and prints each result
beside the same model run in-process, publishes a delta v2 of the MLP live and shows the
replies switch to it, prints the admin status table, then stops everything; with --serve it
keeps the cluster serving (to try the admin commands, the metrics, a dashboard against it)
until Ctrl-C or SIGTERM. Its children never outlive it, even if it is SIGKILLed (launch/procs.py).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ringserve.client import Client
from ringserve.client.admin import AdminClient, format_status
from ringserve.client.params import ParamClient
from ringserve.launch.cli import make_parser, parse_args, positive_int
from ringserve.launch.logsetup import configure_logging
from ringserve.launch.procs import RoleProcess, free_tcp_ports, wait_for_workers
from ringserve.master.scheduler import POLICIES
from ringserve.protocol.security import Security, create_identity
from ringserve.worker import demo


def parser() -> argparse.ArgumentParser:
    p = make_parser("ringserve-local", __doc__)
    p.add_argument("--workers", type=positive_int, default=2, help="worker processes (each serves both models)")
    p.add_argument("--requests", type=int, default=16, help="requests per model")
    p.add_argument("--policy", default="least-outstanding", choices=sorted(POLICIES),
                   help="the master's scheduling policy")
    p.add_argument("--shards", type=int, default=2, help="parameter-server shards")
    p.add_argument("--masters", type=positive_int, default=1,
                   help="active masters (2+: each is the others' peer, every worker registers with all, "
                        "clients fail over between them; see docs/operations.md)")
    p.add_argument("--max-batch-size", type=positive_int, default=32, help="each worker's rows per batch")
    p.add_argument("--workdir", default=None, help="where weights and logs go (default: a temp dir)")
    p.add_argument("--secure", action="store_true",
                   help="fresh CURVE keys for every role in WORKDIR/keys; every socket authenticated and encrypted")
    p.add_argument("--serve", action="store_true",
                   help="after the demo, keep the cluster serving until Ctrl-C or SIGTERM (prints the endpoints "
                        "and commands to try)")
    return p


def demo_weights(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    return {"mlp": demo.mlp(seed=seed).state_dict(), "cnn": demo.cnn(seed=seed).state_dict()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(parser(), argv)
    configure_logging("local", "warning")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below: stop every child
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ringserve-local-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir: {workdir} (logs and shard data)")
    eph = "tcp://127.0.0.1:*"
    keys = make_local_keys(workdir / "keys", args.shards, args.workers) if args.secure else None
    flags = ["--keys", keys] if keys else []
    sec = {role: Security(keys, role) for role in ("client", "admin", "publisher")} if keys else {}
    print(f"security: {'CURVE keys in ' + keys if keys else 'plaintext on loopback (use --secure for CURVE)'}")
    procs: list[RoleProcess] = []
    try:
        shards = [RoleProcess("ringserve.launch.ps", ["--name", f"ps{i}", "--data-dir", str(workdir / f"ps{i}"),
                                            "--bind", eph, "--pub", eph, "--metrics-port", "0", *flags],
                              workdir / f"ps{i}.log",
                              wait_ready=False)
                  for i in range(args.shards)]
        procs += shards
        shard_list = ",".join(f"{s.wait_ready()['name']}={s.info['endpoint']}" for s in shards)
        print(f"parameter servers: {shard_list}")
        masters = start_masters(args.masters, workdir, ["--policy", args.policy, "--metrics-port", "0", *flags])
        procs += masters
        master = {k: ",".join(m.info[k] for m in masters) for k in ("frontend", "backend", "admin")}
        for m in masters:
            print(f"master: {m.info['frontend']} (clients), {m.info['admin']} (admin)")
        v1 = demo_weights(seed=7)
        with ParamClient(shard_list, security=sec.get("publisher")) as pc:
            for model, state in v1.items():
                print(f"published {model} v{pc.publish(model, state)}")
            workers = [RoleProcess("ringserve.launch.worker", [
                "--master", master["backend"], "--name", f"worker-{i}", "--threads", "1",
                "--max-batch-size", str(args.max_batch_size), "--paramservers", shard_list,
                "--model", "mlp=ringserve.worker.demo:mlp", "--model", "cnn=ringserve.worker.demo:cnn",
                "--keep-versions", "2",  # so a split between v1 and v2 (--serve's example) is served
                "--metrics-port", "0", *flags, *(["--key-name", f"worker-{i}"] if keys else [])],
                workdir / f"worker-{i}.log",
                wait_ready=False) for i in range(args.workers)]
            procs += workers
            for w in workers:
                w.wait_ready()
            print("metrics (Prometheus): " + ", ".join(f"{p.info.get('name', 'master')}={p.info['metrics']}"
                                                     for p in (*shards, *masters, *workers)))
            for m in masters:
                wait_for_workers(m.info["admin"], args.workers, timeout=60, model="mlp", version=1,
                                 security=sec.get("admin"))
            run_requests(master["frontend"], args.requests, v1, security=sec.get("client"))
            v2 = dict(v1)
            v2["mlp"] = {**v1["mlp"], "net.4.bias": v1["mlp"]["net.4.bias"] + 1.0}
            version = pc.publish("mlp", {"net.4.bias": v2["mlp"]["net.4.bias"]}, base=1)
            print(f"\npublished mlp v{version} (delta: one tensor), live")
            for m in masters:
                wait_for_workers(m.info["admin"], args.workers, timeout=60, model="mlp", version=version,
                                 security=sec.get("admin"))
            run_requests(master["frontend"], args.requests, v2, models=("mlp",), security=sec.get("client"))
        gateway = start_gateway(workdir, master, keys)
        procs.append(gateway)
        show_gateway(gateway.info["url"])
        time.sleep(1.1)  # one heartbeat, so the batch figures in the table are current
        for m in masters:
            print(f"\n== master {m.info['admin']}" if len(masters) > 1 else "")
            print(format_status(AdminClient(m.info["admin"], security=sec.get("admin")).status()))
        if args.serve:
            return serve_until_stopped(procs, {**master, "gateway": gateway.info["url"]}, shard_list, keys)
        return 0
    finally:
        for p in reversed(procs):
            p.stop()


def serve_until_stopped(procs: list[RoleProcess], master: dict, shard_list: str, keys: str | None) -> int:
    """Print how to reach the cluster, then wait for Ctrl-C/SIGTERM (0) or a role that died (1)."""
    key_flag = f" --keys {keys}" if keys else ""
    security = ", security=Security(KEYS, 'client')" if keys else ""
    print(f"""
serving until Ctrl-C (or SIGTERM); this process's pid is {os.getpid()}
  clients:  {master['frontend']}
  HTTP/OIP: {master.get('gateway')}   (curl {master.get('gateway')}/v2/models/mlp)
            from ringserve import Client{', Security' if keys else ''}; Client(ADDR{security}).infer("mlp", {{"x": ...}})
  try:      ringserve-admin status --master {master['admin']}{key_flag}
            ringserve-admin route --master {master['admin']}{key_flag} --model mlp --split 1=50,2=50
            ringserve-publish --shards {shard_list}{key_flag} --model mlp --list
            ringserve-admin rollback --shards {shard_list}{key_flag} --model mlp --version 1""", flush=True)
    try:
        while all(p.alive() for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
        return 0
    dead = [p.info.get("name", p.module) for p in procs if not p.alive()]
    print(f"error: {', '.join(map(str, dead))} stopped; stopping the rest", file=sys.stderr, flush=True)
    return 1


def start_gateway(workdir: Path, master: dict, keys: str | None) -> RoleProcess:
    """The HTTP/gRPC front door (Open Inference Protocol) on a free loopback port."""
    flags = ["--keys", keys, "--key-name", "local", "--admin-key-name", "local"] if keys else []
    return RoleProcess("ringserve.launch.gateway", ["--master", master["frontend"],
                                                    "--admin", master["admin"],
                                                    "--listen", "127.0.0.1:0", *flags], workdir / "gateway.log")


def show_gateway(url: str) -> None:
    """One real OIP request over HTTP, and the curl line that sends the same."""
    import json
    import urllib.request

    body = {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [0.5] * 256}]}
    req = urllib.request.Request(f"{url}/v2/models/mlp/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 20
    while True:  # the gateway learns the served models from the master's status (about once a second)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                out = json.loads(resp.read())
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    logits = out["outputs"][0]
    print(f"\ngateway (Open Inference Protocol, HTTP): {url}")
    print(f"  POST {url}/v2/models/mlp/infer -> model_version={out.get('model_version')} "
          f"{logits['name']} shape={logits['shape']} argmax={max(range(len(logits['data'])), key=logits['data'].__getitem__)}")
    print(f"""  try: curl -s {url}/v2/models/mlp/infer -H 'Content-Type: application/json' -d '{{"inputs":[{{"name":"x","shape":[1,256],"datatype":"FP32","data":[{",".join(["0.5"] * 256)}]}}]}}'""")


def start_masters(count: int, workdir: Path, flags: list[str]) -> list[RoleProcess]:
    """One master on ephemeral ports, or `count` active masters on free ports, each the others' peer."""
    if count == 1:
        eph = "tcp://127.0.0.1:*"
        return [RoleProcess("ringserve.launch.master", ["--frontend", eph, "--backend", eph, "--admin", eph, *flags],
                            workdir / "master.log")]
    ports = free_tcp_ports(3 * count)
    eps = [[f"tcp://127.0.0.1:{ports[3 * i + j]}" for j in range(3)] for i in range(count)]
    masters = [RoleProcess("ringserve.launch.master", [
        "--frontend", eps[i][0], "--backend", eps[i][1], "--admin", eps[i][2],
        "--peers", ",".join(e[2] for k, e in enumerate(eps) if k != i), *flags],
        workdir / f"master-{i}.log", wait_ready=False) for i in range(count)]
    for m in masters:
        m.wait_ready()
    return masters


def make_local_keys(keys_dir: Path, shards: int, workers: int) -> str:
    """Fresh key pairs for one local cluster: the master, each shard and worker, and this process's roles."""
    for role, names in (("master", ["master"]), ("shard", [f"ps{i}" for i in range(shards)]),
                        ("worker", [f"worker-{i}" for i in range(workers)]),
                        ("client", ["local"]), ("admin", ["local"]), ("publisher", ["local"])):
        for name in names:
            create_identity(keys_dir, role, name)
    return str(keys_dir)


def run_requests(address: str, count: int, weights: dict, models=("mlp", "cnn"), security=None) -> None:
    rng = np.random.default_rng(0)
    reference = {"mlp": demo.mlp().eval(), "cnn": demo.cnn().eval()}
    for name, module in reference.items():
        module.load_state_dict(weights[name])
    inputs = {"mlp": ("x", lambda: rng.standard_normal((1, 256), dtype=np.float32)),
              "cnn": ("image", lambda: rng.standard_normal((1, 1, 28, 28), dtype=np.float32))}
    with Client(address, timeout=10, security=security) as client:
        for model in models:
            name, make = inputs[model]
            batch = [make() for _ in range(count)]
            t0 = time.perf_counter()
            futures = [client.infer_async(model, {name: x}) for x in batch]
            replies = [f.result() for f in futures]
            took = time.perf_counter() - t0
            with torch.inference_mode():
                expect = [reference[model](**{name: torch.from_numpy(x)})["logits"].numpy() for x in batch]
            worst = max(float(np.abs(r.outputs["logits"] - e).max()) for r, e in zip(replies, expect, strict=True))
            for r in replies[:4]:
                print(f"{model} v{r.version} {r.id}: class={int(r.outputs['logits'].argmax())} worker={r.worker} "
                      f"batch_rows={r.header.get('batch_rows')}")
            print(f"{model}: {count} requests in {took * 1000:.1f} ms, max |ringserve - in-process| = {worst:.2e}")


if __name__ == "__main__":
    sys.exit(main())
